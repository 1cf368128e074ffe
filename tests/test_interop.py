"""Import of the SPADE authors' released checkpoints (``SpadeModel.from_spade_checkpoints``).

The files are written here in the release's exact format: one ``torch.save({"model": state_dict, ...})`` per
expert of a BLEEP model (``image_encoder.*``, ``image_projection.*``, ``spot_projection.*``), a
``centroids.npy`` [K, D] and a ``reassigned_clusters.npy`` [K]. The imported model's embeddings are compared
with a direct NumPy computation of the authors' routing and BLEEP's projection head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anndata import AnnData
from scipy.special import erf
from torch import nn

import spade_sc as ss
from spade_sc.model._routing import numpy_routing

D, G, P, K, E = 12, 9, 6, 7, 3


class _BleepHead(nn.Module):
    """BLEEP's ProjectionHead, written out independently of spade_sc."""

    def __init__(self, embedding_dim, projection_dim, dropout=0.1):
        super().__init__()
        self.projection = nn.Linear(embedding_dim, projection_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(projection_dim, projection_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(projection_dim)


class _Bleep(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(4, D)  # stands in for the ResNet the release also stores
        self.image_projection = _BleepHead(D, P)
        self.spot_projection = _BleepHead(G, P)


def _np_head(sd: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """BLEEP head forward in float64 NumPy: LayerNorm(fc(GELU(p)) + p), p = projection(x)."""
    g = {
        k: sd[prefix + k].double().numpy()
        for k in (
            "projection.weight",
            "projection.bias",
            "fc.weight",
            "fc.bias",
            "layer_norm.weight",
            "layer_norm.bias",
        )
    }
    p = x @ g["projection.weight"].T + g["projection.bias"]
    h = 0.5 * p * (1 + erf(p / np.sqrt(2)))
    h = h @ g["fc.weight"].T + g["fc.bias"] + p
    mu = h.mean(1, keepdims=True)
    var = h.var(1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-5) * g["layer_norm.weight"] + g["layer_norm.bias"]


@pytest.fixture
def release(tmp_path):
    """A release in the authors' format, with random (non-default) heads everywhere."""
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    files, states = [], []
    for e in range(E):
        m = _Bleep()
        with torch.no_grad():
            for prm in m.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.5)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        path = tmp_path / f"expert_{e}.pt"
        torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 99, "loss": 1.5}, path)
        files.append(path)
        states.append(m.state_dict())
    centroids = rng.normal(0, 1, (K, D)).astype(np.float32)
    c2e = np.array([0, 1, 2, 0, 1, 2, 1])
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "reassigned_clusters.npy", c2e)
    genes = [f"g{i}" for i in range(G)]
    return {
        "files": files,
        "states": states,
        "centroids": centroids,
        "c2e": c2e,
        "genes": genes,
        "dir": tmp_path,
    }


def _adata(release, n=40, seed=1):
    rng = np.random.default_rng(seed)
    c = release["centroids"]
    # spots scattered around the centroids, so routing is neither uniform nor one-hot
    x = c[rng.integers(0, K, n)] + rng.normal(0, 0.6, (n, D)).astype(np.float32)
    genes = list(release["genes"])
    extra = ["other1", "other2"]
    var_names = genes[::-1] + extra  # different order and extra genes: the panel is looked up by name
    counts = rng.poisson(3.0, (n, len(var_names))).astype(np.float32)
    adata = AnnData(X=counts)
    adata.var_names = var_names
    adata.obs_names = [f"s{i}" for i in range(n)]
    adata.obsm["X_image"] = x
    return adata


def _expected(release, x, tau, which="image", expr=None):
    w = numpy_routing(x, release["centroids"], release["c2e"], E, tau, distance_scale=1.0)
    prefix = "image_projection." if which == "image" else "spot_projection."
    inp = x if which == "image" else expr
    out = np.zeros((len(x), P))
    for e, sd in enumerate(release["states"]):
        out += w[:, e, None] * _np_head(sd, prefix, inp.astype(np.float64))
    return out, w


def _import(release, **kw):
    d = release["dir"]
    return ss.SpadeModel.from_spade_checkpoints(
        release["files"], d / "centroids.npy", d / "reassigned_clusters.npy", genes=release["genes"], **kw
    )


@pytest.mark.parametrize("tau", [0.5, 2.0, 8.0])
def test_image_embedding_matches_numpy(release, tau):
    model = _import(release)
    adata = _adata(release)
    emb, w = model.get_embedding(adata, tau=tau, routing_eps=0)  # dense routing: every expert evaluated
    exp, w_exp = _expected(release, adata.obsm["X_image"], tau)
    np.testing.assert_allclose(w, w_exp, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(emb, exp, rtol=1e-4, atol=1e-5)
    # the default sparse routing stays within its documented 1e-4 of the dense result
    np.testing.assert_allclose(model.get_embedding(adata, tau=tau)[0], exp, rtol=0, atol=1e-4)
    assert model.distance_scale_ == 1.0
    assert model.n_experts_ == E and model.feature_dim_ == D and list(model.genes_) == release["genes"]
    if tau == 2.0:  # the comparison is meaningful: weights are genuinely mixed
        assert ((w > 0.05).sum(1) >= 2).mean() > 0.3


def test_expression_embedding_matches_numpy(release):
    model = _import(release)
    adata = _adata(release)
    emb, _ = model.get_embedding(adata, tau=2.0, modality="expression", routing_eps=0)
    expr = adata[:, release["genes"]].X  # raw values in the panel's order (normalize=False, as the authors)
    exp, _ = _expected(release, adata.obsm["X_image"], 2.0, which="expression", expr=np.asarray(expr))
    np.testing.assert_allclose(emb, exp, rtol=1e-4, atol=1e-5)


def test_expression_normalize_option(release):
    model = _import(release, normalize=True)
    adata = _adata(release)
    emb, _ = model.get_embedding(adata, tau=2.0, modality="expression", routing_eps=0)
    x = np.asarray(adata.X, dtype=np.float64)
    logn = np.log1p(x * (1e4 / x.sum(1, keepdims=True)))
    pos = [list(adata.var_names).index(g) for g in release["genes"]]
    exp, _ = _expected(release, adata.obsm["X_image"], 2.0, which="expression", expr=logn[:, pos])
    np.testing.assert_allclose(emb, exp, rtol=1e-4, atol=1e-4)


def test_arrays_instead_of_files_and_tl_embed(release):
    m1 = _import(release)
    m2 = ss.SpadeModel.from_spade_checkpoints(
        [str(f) for f in release["files"]],
        release["centroids"],
        release["c2e"].astype(np.float64),
        genes=release["genes"],
    )
    adata = _adata(release)
    ss.tl.embed(adata, m2, tau=1.0)
    np.testing.assert_array_equal(adata.obsm["X_spade"], m1.get_embedding(adata, tau=1.0)[0])
    np.testing.assert_allclose(adata.obsm["spade_expert_weights"].sum(1), 1.0, atol=1e-5)


def test_small_tau_routes_to_nearest_centroid_expert(release):
    model = _import(release)
    adata = _adata(release)
    _, w = model.get_embedding(adata, tau=1e-3)
    x = adata.obsm["X_image"]
    nearest = ((x[:, None] - release["centroids"][None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(w.argmax(1), release["c2e"][nearest])


def test_imported_model_save_load_roundtrip(release, tmp_path):
    model = _import(release)
    model.save(tmp_path / "m")
    back = ss.SpadeModel.load(tmp_path / "m")
    adata = _adata(release)
    for modality in ("image", "expression"):
        a, wa = model.get_embedding(adata, tau=1.0, modality=modality)
        b, wb = back.get_embedding(adata, tau=1.0, modality=modality)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(wa, wb)
    assert back.distance_scale_ == 1.0 and not back.normalize


def test_bare_state_dict_and_dataparallel_prefix(release, tmp_path):
    """A bare state dict, or one saved from ``nn.DataParallel`` (``module.`` prefix), imports the same."""
    files = []
    for e, sd in enumerate(release["states"]):
        p = tmp_path / f"bare_{e}.pt"
        torch.save({"module." + k: v for k, v in sd.items()} if e % 2 else dict(sd), p)
        files.append(p)
    model = ss.SpadeModel.from_spade_checkpoints(
        files, release["centroids"], release["c2e"], genes=release["genes"]
    )
    adata = _adata(release)
    np.testing.assert_array_equal(
        model.get_embedding(adata, tau=1.0)[0], _import(release).get_embedding(adata, tau=1.0)[0]
    )


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_number_of_genes(release):
    with pytest.raises(ValueError, match="genes.*pass the gene panel"):
        _import(release | {"genes": release["genes"][:-1]})


def test_duplicate_genes(release):
    with pytest.raises(ValueError, match="duplicated"):
        _import(release | {"genes": ["a"] * G})


def test_expert_index_out_of_range(release, tmp_path):
    bad = release["c2e"].copy()
    bad[0] = E
    with pytest.raises(ValueError, match="one file per expert"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"], release["centroids"], bad, genes=release["genes"]
        )


def test_expert_without_centroid(release):
    bad = np.array([0, 1, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"expert\(s\) \[2\] own no centroid"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"], release["centroids"], bad, genes=release["genes"]
        )


def test_centroid_dim_mismatch(release):
    with pytest.raises(ValueError, match="same release"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"], release["centroids"][:, :-1], release["c2e"], genes=release["genes"]
        )


def test_centroid_count_mismatch(release):
    with pytest.raises(ValueError, match="one entry per centroid"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"], release["centroids"], release["c2e"][:-1], genes=release["genes"]
        )


def test_missing_heads(release, tmp_path):
    p = tmp_path / "nohead.pt"
    torch.save({"model": {k: v for k, v in release["states"][0].items() if not k.startswith("spot_")}}, p)
    with pytest.raises(ValueError, match="spot_projection"):
        ss.SpadeModel.from_spade_checkpoints(
            [p, *release["files"][1:]], release["centroids"], release["c2e"], genes=release["genes"]
        )


def test_missing_file_and_single_path(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="one `.pt` file per expert"):
        ss.SpadeModel.from_spade_checkpoints(
            [tmp_path / "nope.pt", *release["files"][1:]],
            release["centroids"],
            release["c2e"],
            genes=release["genes"],
        )
    with pytest.raises(TypeError, match="list of paths"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"][0], release["centroids"], release["c2e"], genes=release["genes"]
        )


def test_truncated_checkpoint(release, tmp_path):
    p = tmp_path / "trunc.pt"
    p.write_bytes(release["files"][0].read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        ss.SpadeModel.from_spade_checkpoints(
            [p, *release["files"][1:]], release["centroids"], release["c2e"], genes=release["genes"]
        )


def test_object_npy_refused(release, tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}] * K, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="does not unpickle"):
        ss.SpadeModel.from_spade_checkpoints(
            release["files"], release["centroids"], p, genes=release["genes"]
        )
