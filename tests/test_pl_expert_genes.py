"""``pl.expert_genes``: marker genes and prototype patches of each expert."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import spade_sc as ss
from spade_sc.pl._expert_genes import expert_markers, prototype_spots


@pytest.fixture(scope="module")
def fitted(small_toy_master):
    adata = small_toy_master.copy()
    model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=4, n_experts=3, max_epochs=2, proj_dim=16)
    ss.tl.embed(adata, model)
    return adata, model


def test_markers_match_independent_computation(fitted):
    adata, model = fitted
    labels = adata.obs["spade_expert"].astype(int).to_numpy()
    genes = list(model.genes_)
    df = expert_markers(adata, labels, genes, n_genes=3)
    x = adata.X.toarray()
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)[:, [adata.var_names.get_loc(g) for g in genes]]
    best = {}
    for e in np.unique(labels):
        a, b = x[labels == e], x[labels != e]
        d = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0) + b.var(0)) / 2 + 1e-12)
        for g, s in zip(genes, d, strict=True):
            if s > 0 and s > best.get(g, (None, -np.inf))[1]:
                best[g] = (e, s)
    for e in np.unique(labels):
        mine = sorted(((s, g) for g, (ee, s) in best.items() if ee == e), reverse=True)[:3]
        got = df[df["expert"] == e]
        assert list(got["gene"]) == [g for _, g in mine]
        np.testing.assert_allclose(got["score"], [s for s, _ in mine], rtol=1e-6)
    assert not df["gene"].duplicated().any()


def test_markers_find_planted_programme():
    """Spots of 'expert' 1 over-express gene g3 only: it is expert 1's top marker."""
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.poisson(20, (60, 6)).astype(np.float32)
    labels = np.repeat([0, 1], 30)
    x[labels == 1, 3] += 200
    adata = ad.AnnData(x, var={"n": np.arange(6)})
    adata.var_names = [f"g{i}" for i in range(6)]
    df = expert_markers(adata, labels, adata.var_names, n_genes=1)
    assert df.loc[df["expert"] == 1, "gene"].tolist() == ["g3"]


def test_prototype_spots_are_nearest_to_centroids(fitted):
    adata, model = fitted
    feats = adata.obsm["X_image"]
    labels = adata.obs["spade_expert"].astype(int).to_numpy()
    for e in range(model.n_experts_):
        cents = model.centroids_[model.centroid_to_expert_ == e]
        picked = prototype_spots(feats, labels, model, e, len(cents))
        assert (labels[picked] == e).all() and len(set(picked)) == len(picked)
        # with one pick per centroid, each centroid's nearest spot of the expert is among them
        spots = np.flatnonzero(labels == e)
        d = np.linalg.norm(feats[spots, None] - cents[None], axis=2)
        nearest = set(spots[d.argmin(0)])
        if len(nearest) == len(cents):
            assert set(picked) == nearest


def test_figure_layout_and_patches(fitted, tmp_path):
    adata, model = fitted
    fig = ss.pl.expert_genes(model, adata, n_genes=2, n_patches=3)
    fig.savefig(tmp_path / "eg.png", dpi=50)
    heat = fig.axes[0]
    n_exp = model.n_experts_
    img = heat.get_images()[0].get_array()
    assert img.shape[0] == n_exp
    assert [t.get_text() for t in heat.get_yticklabels()][0].startswith("expert 0 (")
    patches = [a for a in fig.axes if a.get_gid() and a.get_gid().startswith("patch:")]
    assert 0 < len(patches) <= n_exp * 3
    # a patch is the H&E around its spot
    e, name = patches[0].get_gid().split(":")[1:]
    i = adata.obs_names.get_loc(name)
    lib = adata.obs["library_id"].iloc[i]
    he = adata.uns["spatial"][lib]["images"]["hires"]
    x, y = adata.obsm["spatial"][i].astype(int)
    shown = patches[0].get_images()[0].get_array()
    half = shown.shape[0] // 2
    np.testing.assert_array_equal(shown[half, half], he[y, x])
    plt.close("all")


def test_heatmap_only_and_errors(fitted):
    adata, model = fitted
    fig = ss.pl.expert_genes(model, adata, n_patches=0)
    assert not [a for a in fig.axes if a.get_gid()]
    with pytest.raises(ValueError, match="fitted"):
        ss.pl.expert_genes(ss.SpadeModel(), adata)
    with pytest.raises(ValueError, match="n_genes"):
        ss.pl.expert_genes(model, adata, n_genes=0)
    plt.close("all")


def test_candidate_genes(fitted):
    adata, model = fitted
    fig = ss.pl.expert_genes(model, adata, genes=["TUM1", "IMM1", "STR1", "ADI1", "NEC1", "NOPE"], n_genes=1,
                             n_patches=0)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels and set(labels) <= {"TUM1", "IMM1", "STR1", "ADI1", "NEC1"}
    with pytest.raises(KeyError, match="`genes`"):
        ss.pl.expert_genes(model, adata, genes=["NOPE"])
    plt.close("all")
