"""Property-based tests (hypothesis) of routing, the contrastive loss and gene-panel selection.

Inputs are drawn from seeded NumPy generators whose seed and sizes hypothesis chooses, so every example is
reproducible from its printed arguments.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import spade_sc as ss
from spade_sc.model._loss import soft_clip_loss
from spade_sc.model._routing import numpy_routing, routing_weights, sparsify_weights

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
FAST = settings(max_examples=25, **_COMMON)
SLOW = settings(max_examples=10, **_COMMON)


# hypothesis caches examples and constants under ``./.hypothesis`` by default; keep them out of the checkout
_HOME = Path(tempfile.gettempdir()) / "spade_sc-hypothesis"
set_hypothesis_home_dir(_HOME)


seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------------------ routing
def _routing_problem(seed, n, k, d, e):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d)).astype(np.float32)
    c = rng.normal(0, 1, (k, d)).astype(np.float32)
    c2e = np.concatenate([np.arange(e), rng.integers(0, e, k - e)])  # every expert owns ≥ 1 centroid
    rng.shuffle(c2e)
    return x, c, c2e


def _route(x, c, c2e, e, tau, scale=1.0):
    return routing_weights(
        torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(c2e), e, tau, scale
    ).numpy()


routing_args = dict(
    seed=seeds,
    n=st.integers(1, 30),
    k=st.integers(1, 12),
    d=st.integers(1, 8),
    e_frac=st.floats(0, 1),
    tau=st.floats(0.05, 20),
    scale=st.floats(0.1, 10),
)


def _e(k, e_frac):
    return 1 + int(e_frac * (k - 1))


@FAST
@given(**routing_args)
def test_routing_weights_on_the_simplex_and_match_numpy(seed, n, k, d, e_frac, tau, scale):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    w = _route(x, c, c2e, e, tau, scale)
    assert w.shape == (n, e)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(w, numpy_routing(x, c, c2e, e, tau, scale), atol=2e-4)


@FAST
@given(**routing_args, perm_seed=seeds)
def test_routing_equivariant_to_spot_order(seed, n, k, d, e_frac, tau, scale, perm_seed):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    perm = np.random.default_rng(perm_seed).permutation(n)
    np.testing.assert_allclose(
        _route(x[perm], c, c2e, e, tau, scale), _route(x, c, c2e, e, tau, scale)[perm], atol=1e-6
    )


@FAST
@given(**routing_args, perm_seed=seeds)
def test_routing_invariant_to_centroid_order_and_equivariant_to_expert_labels(
    seed, n, k, d, e_frac, tau, scale, perm_seed
):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    rng = np.random.default_rng(perm_seed)
    w = _route(x, c, c2e, e, tau, scale)
    pc = rng.permutation(k)  # centroids listed in another order, each keeping its expert
    np.testing.assert_allclose(_route(x, c[pc], c2e[pc], e, tau, scale), w, atol=1e-5)
    pe = rng.permutation(e)  # experts renamed: expert j becomes pe[j]
    w2 = _route(x, c, pe[c2e], e, tau, scale)
    np.testing.assert_allclose(w2[:, pe], w, atol=1e-6)


@FAST
@given(**routing_args, shift=st.floats(-50, 50))
def test_routing_invariant_to_translation(seed, n, k, d, e_frac, tau, scale, shift):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    # translate in float64: float32 rounding of x + t would be amplified by 1 / (scale · tau) up to 200
    t = np.float64(shift) * np.ones(d)
    x, c = x.astype(np.float64), c.astype(np.float64)
    w = numpy_routing(x, c, c2e, e, tau, scale)
    np.testing.assert_allclose(numpy_routing(x + t, c + t, c2e, e, tau, scale), w, atol=1e-6)


@FAST
@given(seed=seeds, n=st.integers(1, 30), k=st.integers(2, 12), d=st.integers(1, 8), e_frac=st.floats(0, 1))
def test_small_tau_routes_to_the_nearest_centroid_expert(seed, n, k, d, e_frac):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    dist = np.sqrt(((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1))
    srt = np.sort(dist, 1)
    assume((srt[:, 1] - srt[:, 0]).min() > 1e-2)  # a unique nearest centroid
    w = _route(x, c, c2e, e, tau=1e-4)
    np.testing.assert_array_equal(w.argmax(1), c2e[dist.argmin(1)])


@FAST
@given(**routing_args, eps=st.floats(0, 0.6))
def test_sparsified_weights_stay_on_the_simplex(seed, n, k, d, e_frac, tau, scale, eps):
    e = _e(k, e_frac)
    x, c, c2e = _routing_problem(seed, n, k, d, e)
    w = torch.from_numpy(_route(x, c, c2e, e, tau, scale)).double()
    s = sparsify_weights(w, eps).numpy()
    w = w.numpy()
    np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-6)
    assert (s >= 0).all()
    rows = np.arange(n)
    assert (s[rows, w.argmax(1)] > 0).all()  # the top expert is always kept
    dropped = (w < eps) & (np.arange(e)[None] != w.argmax(1)[:, None])
    assert (s[dropped] == 0).all()
    kept = ~dropped
    # kept weights keep their ratios
    np.testing.assert_allclose(s[kept], (w / np.where(kept, w, 0).sum(1, keepdims=True))[kept], rtol=1e-6)


# ------------------------------------------------------------------------------------------ the loss
def _loss_problem(seed, e, b, p):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, b, p, generator=g, dtype=torch.float64), torch.randn(
        e, b, p, generator=g, dtype=torch.float64
    )


loss_args = dict(
    seed=seeds, e=st.integers(1, 4), b=st.integers(1, 12), p=st.integers(1, 8), t=st.floats(0.1, 5)
)


@FAST
@given(**loss_args, perm_seed=seeds)
def test_loss_invariant_to_spot_order_within_a_batch(seed, e, b, p, t, perm_seed):
    img, expr = _loss_problem(seed, e, b, p)
    perm = torch.from_numpy(np.random.default_rng(perm_seed).permutation(b))
    base = soft_clip_loss(img, expr, t)
    torch.testing.assert_close(soft_clip_loss(img[:, perm], expr[:, perm], t), base, rtol=1e-5, atol=1e-6)
    assert (base >= -1e-6).all()  # a cross-entropy with soft targets is non-negative


@FAST
@given(**loss_args, rot_seed=seeds)
def test_loss_invariant_to_a_common_rotation_of_the_joint_space(seed, e, b, p, t, rot_seed):
    """The loss sees embeddings only through inner products: rotating both modalities changes nothing."""
    img, expr = _loss_problem(seed, e, b, p)
    q, _ = np.linalg.qr(np.random.default_rng(rot_seed).normal(size=(p, p)))
    q = torch.from_numpy(q)
    torch.testing.assert_close(
        soft_clip_loss(img @ q, expr @ q, t), soft_clip_loss(img, expr, t), rtol=1e-5, atol=1e-6
    )


@FAST
@given(**loss_args, pad=st.integers(1, 6))
def test_loss_ignores_masked_padding(seed, e, b, p, t, pad):
    img, expr = _loss_problem(seed, e, b, p)
    junk_img, junk_expr = _loss_problem(seed + 1, e, pad, p)
    mask = torch.cat([torch.ones(e, b, dtype=torch.bool), torch.zeros(e, pad, dtype=torch.bool)], 1)
    padded = soft_clip_loss(torch.cat([img, 100 * junk_img], 1), torch.cat([expr, junk_expr], 1), t, mask)
    torch.testing.assert_close(padded, soft_clip_loss(img, expr, t), rtol=1e-5, atol=1e-6)


@FAST
@given(**loss_args)
def test_loss_of_each_expert_depends_on_its_own_batch_only(seed, e, b, p, t):
    assume(e >= 2)
    img, expr = _loss_problem(seed, e, b, p)
    other_img, other_expr = _loss_problem(seed + 7, e, b, p)
    img2, expr2 = img.clone(), expr.clone()
    img2[1:], expr2[1:] = other_img[1:], other_expr[1:]
    torch.testing.assert_close(
        soft_clip_loss(img2, expr2, t)[0], soft_clip_loss(img, expr, t)[0], rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------------ gene panel
def _panel_data(seed, n_batches, spots, genes):
    rng = np.random.default_rng(seed)
    rates = rng.gamma(2.0, 4.0, genes)
    blocks, batch = [], []
    for bi in range(n_batches):
        r = rates * rng.gamma(5.0, 0.2, genes)  # batch effect
        r[rng.random(genes) < 0.15] = 0.0  # some genes absent from this batch
        blocks.append(rng.poisson(r * rng.gamma(4.0, 0.25, (spots, 1))))
        batch += [f"b{bi}"] * spots
    x = np.concatenate(blocks).astype(np.float32)
    adata = AnnData(X=x)
    adata.obs_names = [f"s{i}" for i in range(len(x))]
    adata.var_names = [f"g{j}" for j in range(genes)]
    adata.obs["batch"] = pd.Categorical(batch)
    return adata


def _selected(adata, n_top):
    out = ss.pp.select_genes(adata, batch_key="batch", n_top_genes=n_top, copy=True)
    return out.var["spade_gene"]


panel_args = dict(
    seed=seeds,
    n_batches=st.integers(1, 3),
    spots=st.integers(12, 30),
    genes=st.integers(12, 40),
    n_top=st.integers(1, 8),
)


def _no_duplicate_genes(adata):
    return len(np.unique(adata.X.T, axis=0)) == adata.n_vars


@SLOW
@given(**panel_args, perm_seed=seeds)
def test_gene_panel_invariant_to_spot_order(seed, n_batches, spots, genes, n_top, perm_seed):
    adata = _panel_data(seed, n_batches, spots, genes)
    perm = np.random.default_rng(perm_seed).permutation(adata.n_obs)
    pd.testing.assert_series_equal(_selected(adata[perm].copy(), n_top), _selected(adata, n_top))


@SLOW
@given(**panel_args, perm_seed=seeds)
def test_gene_panel_invariant_to_gene_order_and_batch_names(seed, n_batches, spots, genes, n_top, perm_seed):
    adata = _panel_data(seed, n_batches, spots, genes)
    assume(_no_duplicate_genes(adata))  # identical genes tie, and ties are broken by position
    base = _selected(adata, n_top)
    perm = np.random.default_rng(perm_seed).permutation(adata.n_vars)
    other = adata[:, perm].copy()
    other.obs["batch"] = other.obs["batch"].cat.rename_categories(lambda b: f"slide_{b[::-1]}")
    pd.testing.assert_series_equal(_selected(other, n_top).loc[base.index], base)


@SLOW
@given(**panel_args)
def test_gene_panel_is_shared_and_grows_with_n_top(seed, n_batches, spots, genes, n_top):
    adata = _panel_data(seed, n_batches, spots, genes)
    x = adata.X
    shared = np.ones(adata.n_vars, bool)
    for b in adata.obs["batch"].cat.categories:
        shared &= (x[(adata.obs["batch"] == b).to_numpy()] > 0).any(0)
    assume(shared.any())
    sel = _selected(adata, n_top).to_numpy()
    assert sel.any()
    assert not (sel & ~shared).any()  # only genes detected in every batch
    more = _selected(adata, n_top + 3).to_numpy()
    assert not (sel & ~more).any()  # a larger per-batch quota only adds genes


# ------------------------------------------------------------------------------------------ the fitted model
@pytest.fixture(scope="module")
def fitted():
    adata = ss.datasets.toy(random_state=4, n_slides=2, grid=8)
    model = ss.tl.fit_spade(
        adata.copy(), n_prototypes=4, n_experts=3, proj_dim=8, max_epochs=1, batch_size=64, device="cpu"
    )
    return adata, model


@SLOW
@given(perm_seed=seeds, tau=st.floats(0.02, 2.0))
def test_embedding_equivariant_to_spot_order(fitted, perm_seed, tau):
    adata, model = fitted
    perm = np.random.default_rng(perm_seed).permutation(adata.n_obs)
    emb, w = model.get_embedding(adata, tau=tau)
    emb_p, w_p = model.get_embedding(adata[perm].copy(), tau=tau)
    np.testing.assert_allclose(emb_p, emb[perm], atol=1e-5)
    np.testing.assert_allclose(w_p, w[perm], atol=1e-6)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
