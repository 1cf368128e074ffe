"""``pl.experts``: spots drawn at the right place and in the right colour over the H&E (AnnData, SpatialData)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

import spade_sc as ss
from spade_sc.pl._experts import routing_entropy
from spade_sc.pl._spatial import default_palette, get_slide

DPI = 100


def render(fig, path):
    """Save ``fig`` to PNG and return its pixels (rows from the top, RGBA floats)."""
    fig.savefig(path, dpi=DPI)
    return mpimg.imread(path)


def pixel(ax, img, xy):
    """PNG pixels under data points ``xy`` of ``ax`` (the figure must have been saved at DPI)."""
    disp = ax.transData.transform(np.asarray(xy, dtype=float))
    cols = np.floor(disp[:, 0]).astype(int)
    rows = img.shape[0] - 1 - np.floor(disp[:, 1]).astype(int)
    return img[rows, cols, :3]


@pytest.fixture(scope="module")
def fitted(small_toy_master):
    adata = small_toy_master.copy()
    model = ss.tl.fit_spade(
        adata, batch_key="slide", n_prototypes=4, n_experts=3, max_epochs=2, proj_dim=16, lr=1e-3
    )
    ss.tl.embed(adata, model)
    return adata, model


def test_expert_colours_at_every_spot(fitted, tmp_path):
    adata, _ = fitted
    fig, ax = plt.subplots(figsize=(5, 5), dpi=DPI)
    ss.pl.experts(adata, library_id="slide1", alpha=1.0, ax=ax)
    img = render(fig, tmp_path / "experts.png")
    sel = (adata.obs["library_id"] == "slide1").to_numpy()
    codes = adata.obs["spade_expert"].cat.codes.to_numpy()[sel]
    expected = np.array([to_rgba(c)[:3] for c in default_palette(3)])[codes]
    got = pixel(ax, img, adata.obsm["spatial"][sel])  # toy: hires scale factor 1
    np.testing.assert_allclose(got, expected, atol=2 / 255)
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "expert"
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(map(str, np.unique(codes)))
    assert ax.get_title() == "slide1: expert"
    plt.close(fig)


def test_image_under_the_spots_is_the_slides_he(fitted, tmp_path):
    """Between spots (the spots are 0.8 pitch wide) the H&E of that very slide shows through."""
    adata, _ = fitted
    fig, ax = plt.subplots(figsize=(6, 6), dpi=DPI)
    ss.pl.experts(adata, library_id="slide2", alpha=1.0, legend=False, ax=ax)
    png = render(fig, tmp_path / "he.png")
    he = adata.uns["spatial"]["slide2"]["images"]["hires"]
    # corners between four spots: pixel (x, y) = (k·32, l·32) of the image
    pts = np.array([[32 * i, 32 * j] for i in range(2, 9, 2) for j in range(2, 9, 2)], dtype=float)
    got = pixel(ax, png, pts)
    local = np.array([he[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3).mean(0) for x, y in pts])
    # the PNG resamples the image, so compare with the mean colour of the 5 × 5 neighbourhood
    assert np.abs(got * 255 - local).mean() < 25
    assert not np.allclose(got, 1.0)  # not blank
    plt.close(fig)


def test_weight_and_entropy_maps(fitted, tmp_path):
    adata, _ = fitted
    sel = (adata.obs["library_id"] == "slide0").to_numpy()
    fig, axs = plt.subplots(1, 2, figsize=(10, 5), dpi=DPI)
    ss.pl.experts(adata, library_id="slide0", color="weight", expert=1, alpha=1.0, cmap="viridis", ax=axs[0])
    ss.pl.experts(adata, library_id="slide0", color="entropy", alpha=1.0, cmap="magma", ax=axs[1])
    png = render(fig, tmp_path / "weights.png")
    labels = sorted(a.get_ylabel() for a in fig.axes[2:])
    assert labels == ["routing entropy (nats)", "routing weight of expert 1"]
    w = adata.obsm["spade_expert_weights"][sel]
    xy = adata.obsm["spatial"][sel]
    cm = matplotlib.colormaps["viridis"]
    expected = cm(w[:, 1])[:, :3]  # weight scale is fixed to [0, 1]
    np.testing.assert_allclose(pixel(axs[0], png, xy), expected, atol=3 / 255)
    ent = routing_entropy(w)
    expected = matplotlib.colormaps["magma"](ent / np.log(w.shape[1]))[:, :3]
    np.testing.assert_allclose(pixel(axs[1], png, xy), expected, atol=3 / 255)
    plt.close(fig)


def test_routing_entropy_known_values():
    w = np.array([[1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(routing_entropy(w), [0.0, np.log(4), np.log(2)])


def test_lowres_image_scale(fitted, tmp_path):
    """An image at scale factor 0.5 puts the spots at half their full-resolution coordinates."""
    adata, _ = fitted
    one = adata[adata.obs["library_id"] == "slide0"].copy()
    he = one.uns["spatial"]["slide0"]["images"]["hires"]
    one.uns["spatial"]["slide0"]["images"] = {"lowres": he[::2, ::2].copy()}
    one.uns["spatial"]["slide0"]["scalefactors"]["tissue_lowres_scalef"] = 0.5
    slide = get_slide(one)
    np.testing.assert_allclose(slide.xy, one.obsm["spatial"] * 0.5)
    assert slide.radius == pytest.approx(0.5 * one.uns["spatial"]["slide0"]["scalefactors"]["spot_diameter_fullres"] / 2)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=DPI)
    ss.pl.experts(one, alpha=1.0, ax=ax)  # one slide: no library_id needed
    png = render(fig, tmp_path / "low.png")
    codes = one.obs["spade_expert"].cat.codes.to_numpy()
    expected = np.array([to_rgba(c)[:3] for c in default_palette(3)])[codes]
    np.testing.assert_allclose(pixel(ax, png, slide.xy), expected, atol=2 / 255)
    plt.close(fig)


def test_errors_and_no_modification(fitted):
    adata, _ = fitted
    before = (set(adata.obs.columns), set(adata.obsm), set(adata.uns))
    with pytest.raises(ValueError, match="library_id"):
        ss.pl.experts(adata)
    with pytest.raises(ValueError, match="not in"):
        ss.pl.experts(adata, library_id="nope")
    with pytest.raises(ValueError, match="expert="):
        ss.pl.experts(adata, library_id="slide0", color="weight")
    with pytest.raises(ValueError, match="color"):
        ss.pl.experts(adata, library_id="slide0", color="domain")
    bare = ad.AnnData(np.zeros((3, 2)), obsm={"spatial": np.zeros((3, 2))})
    with pytest.raises(KeyError, match="tl.embed"):
        ss.pl.experts(bare)
    with pytest.raises(KeyError, match="spatial"):
        ss.pl.experts(ad.AnnData(np.zeros((3, 2))))
    assert (set(adata.obs.columns), set(adata.obsm), set(adata.uns)) == before
    plt.close("all")


# ------------------------------------------------------------------------------------------ SpatialData
def _sdata(multiscale: bool = False):
    """A 200 × 200 px image whose pixels are 2 units of 'global'; 16 spots on a grid in 'global' units."""
    import geopandas as gpd  # noqa: F401  (spatialdata shapes)
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    img = np.zeros((3, 200, 200), dtype=np.uint8)
    img[0], img[1], img[2] = 30, 160, 60  # green tissue
    kw = {"scale_factors": [2]} if multiscale else {}
    image = Image2DModel.parse(img, dims=("c", "y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))}, **kw)
    g = np.arange(4) * 80.0 + 80.0  # 80 … 320 global units
    xy = np.array([[x, y] for y in g for x in g])
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 20.0), transformations={"global": Identity()})
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(xy)), "instance_id": shapes.index.to_numpy(),
         "spade_expert": pd.Categorical(np.arange(len(xy)) % 3, categories=[0, 1, 2])},
        index=[f"s{i}" for i in range(len(xy))],
    )
    table = ad.AnnData(np.zeros((len(xy), 2), dtype=np.float32), obs=obs)
    table.obsm["spatial"] = xy
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table}), xy


def test_spatialdata_transformations(tmp_path):
    sdata, xy = _sdata()
    slide = get_slide(sdata)
    np.testing.assert_allclose(slide.xy, xy / 2)  # global → image pixels
    assert slide.radius == pytest.approx(10.0)  # 20 global units = 10 px
    fig, ax = plt.subplots(figsize=(5, 5), dpi=DPI)
    ss.pl.experts(sdata, table_key="table", image_key="he", alpha=1.0, ax=ax)
    png = render(fig, tmp_path / "sd.png")
    expected = np.array([to_rgba(c)[:3] for c in default_palette(3)])[np.arange(len(xy)) % 3]
    np.testing.assert_allclose(pixel(ax, png, xy / 2), expected, atol=2 / 255)
    # halfway between spots: the green image
    between = xy[:3] / 2 + np.array([20.0, 0.0])
    np.testing.assert_allclose(pixel(ax, png, between), np.tile([30, 160, 60], (3, 1)) / 255, atol=3 / 255)
    plt.close(fig)


def test_spatialdata_multiscale_level_choice():
    sdata, xy = _sdata(multiscale=True)
    fine = get_slide(sdata, target_px=None)
    coarse = get_slide(sdata, target_px=50)  # the spots span 120 px at level 0 and 60 px at level 1
    np.testing.assert_allclose(fine.xy, xy / 2)
    np.testing.assert_allclose(coarse.xy, xy / 4)
    assert coarse.image.shape[:2] == (100, 100)
    assert coarse.radius == pytest.approx(5.0)
    ax = ss.pl.experts(sdata)
    assert ax.get_images()  # the image is drawn
    plt.close("all")


def test_spatialdata_errors():
    sdata, _ = _sdata()
    with pytest.raises(KeyError, match="image_key"):
        ss.pl.experts(sdata, image_key="nope")
    with pytest.raises(ValueError, match="coordinate system"):
        ss.pl.experts(sdata, coordinate_system="aligned")
    plt.close("all")


def test_spatialdata_from_io_matches_anndata(fitted, tmp_path):
    """`ss.io.to_spatialdata` gives each library its own coordinate system: spots land where AnnData puts them."""
    adata, _ = fitted
    sdata = ss.io.to_spatialdata(adata, library_key="library_id")
    for lib in ("slide0", "slide2"):
        a = get_slide(adata, library_id=lib)
        s = get_slide(sdata, library_id=lib)  # coordinate system and image chosen from the library
        np.testing.assert_allclose(s.xy, a.xy)
        assert s.radius == pytest.approx(a.radius)
        np.testing.assert_array_equal(np.asarray(s.image), a.image)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=DPI)
    ss.pl.experts(sdata, library_id="slide2", alpha=1.0, ax=ax)
    png = render(fig, tmp_path / "io.png")
    sel = (adata.obs["library_id"] == "slide2").to_numpy()
    codes = adata.obs["spade_expert"].cat.codes.to_numpy()[sel]
    expected = np.array([to_rgba(c)[:3] for c in default_palette(3)])[codes]
    np.testing.assert_allclose(pixel(ax, png, adata.obsm["spatial"][sel]), expected, atol=2 / 255)
    plt.close(fig)
