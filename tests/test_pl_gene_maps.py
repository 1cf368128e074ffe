"""``pl.gene_maps``: measured and predicted expression side by side, values drawn in the right colours."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import spade_sc as ss
from spade_sc.pl._gene_maps import _measured

DPI = 100


def pixel(ax, img, xy):
    disp = ax.transData.transform(np.asarray(xy, dtype=float))
    return img[img.shape[0] - 1 - np.floor(disp[:, 1]).astype(int), np.floor(disp[:, 0]).astype(int), :3]


@pytest.fixture
def one_slide(small_toy):
    adata = small_toy[small_toy.obs["slide"] == "slide0"].copy()
    rng = np.random.default_rng(0)
    genes = ["TUM1", "IMM1", "STR1"]
    pred = rng.gamma(2.0, 1.0, (adata.n_obs, 3)).astype(np.float32)
    adata.obsm["spade_predicted"] = pred
    adata.uns["spade_predicted"] = {"genes": np.array(genes)}
    return adata, genes, pred


def test_measured_is_log1p_cp10k(one_slide):
    adata, genes, _ = one_slide
    x = adata.X.toarray()
    expected = np.log1p(x[:, [adata.var_names.get_loc(g) for g in genes]] / x.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(_measured(adata, genes, None, True), expected, rtol=1e-6)
    np.testing.assert_allclose(_measured(adata, genes, "counts", False), x[:, [adata.var_names.get_loc(g) for g in genes]])


def test_panels_titles_and_colours(one_slide, tmp_path):
    adata, genes, pred = one_slide
    fig = plt.figure(figsize=(8, 12), dpi=DPI)
    ax = fig.add_subplot(111)
    out = ss.pl.gene_maps(adata, genes, alpha=1.0, cmap="viridis", ax=ax)
    assert out is fig
    out.savefig(tmp_path / "maps.png", dpi=DPI)
    png = mpimg.imread(tmp_path / "maps.png")
    panels = [a for a in fig.axes if a.get_title()]
    assert len(panels) == 6  # 3 genes × (measured, predicted)
    colorbars = [a for a in fig.axes if not a.get_title()]
    assert len(colorbars) == 6
    meas = _measured(adata, genes, None, True)
    for i, g in enumerate(genes):
        m_ax, p_ax = panels[2 * i], panels[2 * i + 1]
        assert m_ax.get_title() == f"{g}: measured"
        r = np.corrcoef(meas[:, i], pred[:, i])[0, 1]
        assert p_ax.get_title() == f"{g}: predicted (r = {r:.2f})"
        # every spot's centre pixel has the colour of its value on the panel's own scale
        for vals, a in ((meas[:, i], m_ax), (pred[:, i].astype(float), p_ax)):
            expected = matplotlib.colormaps["viridis"]((vals - vals.min()) / (vals.max() - vals.min()))[:, :3]
            np.testing.assert_allclose(pixel(a, png, adata.obsm["spatial"]), expected, atol=3 / 255)
    plt.close(fig)


def test_shared_scale_and_layer(one_slide):
    adata, genes, pred = one_slide
    adata.layers["pred"] = np.zeros(adata.shape, dtype=np.float32)
    adata.layers["pred"][:, adata.var_names.get_loc("TUM1")] = pred[:, 0]
    fig = ss.pl.gene_maps(adata, "TUM1", predicted_layer="pred", share_scale=True, layer="counts", normalize=False)
    panels = [a for a in fig.axes if a.get_title()]
    assert len(panels) == 2
    lims = [a.collections[0].get_clim() for a in panels]
    assert lims[0] == lims[1]
    counts = adata.layers["counts"][:, adata.var_names.get_loc("TUM1")].toarray().ravel()
    assert lims[0][1] == pytest.approx(max(counts.max(), pred[:, 0].max()))
    plt.close("all")


def test_predictions_as_dataframe(one_slide):
    adata, genes, pred = one_slide
    adata.obsm["p"] = pd.DataFrame(pred, index=adata.obs_names, columns=genes)
    fig = ss.pl.gene_maps(adata, ["STR1"], predicted_key="p")
    predicted_panel = [a for a in fig.axes if a.get_title().startswith("STR1: predicted")][0]
    np.testing.assert_allclose(np.asarray(predicted_panel.collections[0].get_array()), pred[:, 2], rtol=1e-6)
    plt.close("all")


def test_errors(one_slide):
    adata, genes, _ = one_slide
    with pytest.raises(KeyError, match="predict_expression"):
        ss.pl.gene_maps(adata, genes, predicted_key="missing")
    with pytest.raises(KeyError, match="not predicted"):
        ss.pl.gene_maps(adata, ["BG1"])
    with pytest.raises(KeyError, match="var_names"):
        ss.pl.gene_maps(adata, ["NOPE"])
    adata.layers["logged"] = np.log1p(adata.X.toarray())
    with pytest.raises(ValueError, match="normalize=False"):
        ss.pl.gene_maps(adata, genes, layer="logged")
    with pytest.raises(ValueError, match="empty"):
        ss.pl.gene_maps(adata, [])
    plt.close("all")


def test_end_to_end_with_predict_expression(small_toy, tmp_path):
    ref = small_toy[small_toy.obs["slide"] != "slide2"].copy()
    query = small_toy[small_toy.obs["slide"] == "slide2"].copy()
    model = ss.tl.fit_spade(ref, batch_key="slide", n_prototypes=4, n_experts=2, max_epochs=2, proj_dim=16)
    ss.tl.predict_expression(query, model, reference=ref, k=10)
    fig = ss.pl.gene_maps(query, ["TUM1", "IMM1"])
    fig.savefig(tmp_path / "e2e.png", dpi=40)
    assert len([a for a in fig.axes if a.get_title()]) == 4
    assert isinstance(query, ad.AnnData) and "spade_predicted" in query.obsm
    plt.close("all")
