"""``pl.embedding``: UMAP of X_spade via scanpy, points in the right colours, the caller's data untouched."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba

import spade_sc as ss
from spade_sc.pl._spatial import default_palette


@pytest.fixture(scope="module")
def fitted(small_toy_master):
    adata = small_toy_master.copy()
    model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=4, n_experts=3, max_epochs=2, proj_dim=16)
    ss.tl.embed(adata, model)
    # distinct 2-D coordinates so that points can be matched back to spots
    adata.obsm["X_test2d"] = np.stack([np.arange(adata.n_obs), np.arange(adata.n_obs) % 7], 1).astype(float)
    return adata


def _colours_by_spot(ax, adata):
    coll = ax.collections[0]
    offsets = np.asarray(coll.get_offsets())
    fc = np.asarray(coll.get_facecolors())
    spot = offsets[:, 0].round().astype(int)  # x = spot index
    assert sorted(spot) == list(range(adata.n_obs))
    out = np.empty((adata.n_obs, 4))
    out[spot] = fc if len(fc) > 1 else np.tile(fc, (len(spot), 1))
    return out


def test_expert_colours_match_pl_experts(fitted, tmp_path):
    adata = fitted
    ax = ss.pl.embedding(adata, color="expert", basis="X_test2d")
    ax.figure.savefig(tmp_path / "emb.png", dpi=50)
    got = _colours_by_spot(ax, adata)
    codes = adata.obs["spade_expert"].cat.codes.to_numpy()
    expected = np.array([to_rgba(c) for c in default_palette(3)])[codes]
    np.testing.assert_allclose(got[:, :3], expected[:, :3], atol=1e-6)
    assert ax.get_title() == "spade_expert"
    assert ax.get_xlabel() == "test2d1"
    assert "spade_expert_colors" not in adata.uns  # the caller's data is not modified
    plt.close("all")


def test_several_colours_panels(fitted):
    adata = fitted
    fig = ss.pl.embedding(adata, color=["slide", "TUM1", "entropy", "expert"], basis="X_test2d", layer="counts")
    visible = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title() for a in visible] == ["slide", "TUM1", "routing entropy", "spade_expert"]
    # the gene panel shows the gene's counts (scanpy sorts points by value, so compare sorted)
    gene_ax = visible[1]
    vals = np.asarray(gene_ax.collections[0].get_array())
    counts = adata.layers["counts"][:, adata.var_names.get_loc("TUM1")].toarray().ravel()
    np.testing.assert_allclose(np.sort(vals), np.sort(counts))
    plt.close("all")


def test_umap_computed_on_the_fly(fitted):
    adata = fitted
    before = set(adata.obsm), set(adata.uns), set(adata.obsp)
    ax = ss.pl.embedding(adata, color="slide", n_neighbors=10)
    coords = np.asarray(ax.collections[0].get_offsets())
    assert coords.shape == (adata.n_obs, 2) and np.isfinite(coords).all()
    assert ax.get_xlabel() == "UMAP1"
    assert (set(adata.obsm), set(adata.uns), set(adata.obsp)) == before
    # slides are mixed in SPADE's space only if the experts are shared: each expert's points lie together;
    # at least check the layout is not degenerate
    assert coords.std(0).min() > 0.1
    plt.close("all")


def test_errors(fitted):
    adata = fitted
    with pytest.raises(KeyError, match="neither"):
        ss.pl.embedding(adata, color="nope", basis="X_test2d")
    with pytest.raises(KeyError, match="basis"):
        ss.pl.embedding(adata, basis="X_nope")
    with pytest.raises(KeyError, match="tl.embed"):
        ss.pl.embedding(adata, color="slide", use_rep="X_missing")
    with pytest.raises(ValueError, match="empty"):
        ss.pl.embedding(adata, color=[])
