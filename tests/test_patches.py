"""Spot patches: geometry, image readers (array, JPEG, pyramidal TIFF), edges, HEST patch files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from anndata import AnnData

import spade_sc as ss
from spade_sc.pp._image_readers import ArrayReader, PILReader, TiffReader, open_image
from spade_sc.pp._sources import choose_level, crop_patch, patch_windows, window_coverage


def _gradient_image(h=300, w=400):
    """An image whose pixel values encode their coordinates (R = x mod 256, G = y mod 256, B = (x+y) // 4)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, ((xx + yy) // 4) % 256], axis=-1).astype(np.uint8)


def _adata(centres, img=None, mpp=1.0, lib="s1"):
    a = AnnData(np.zeros((len(centres), 2), dtype=np.float32))
    a.obs_names = [f"spot{i}" for i in range(len(centres))]
    a.obsm["spatial"] = np.asarray(centres, dtype=float)
    if img is not None:
        a.uns["spatial"] = {
            lib: {
                "images": {"hires": img},
                "scalefactors": {"tissue_hires_scalef": 1.0, "microns_per_pixel": mpp},
            }
        }
    return a


def _write_pyramid(path, img, mpp, *, subifds: bool):
    import tifffile

    opts = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tw:
        if subifds:
            tw.write(img, subifds=2, resolution=res, resolutionunit="CENTIMETER", **opts)
            for d in (2, 4):
                tw.write(img[::d, ::d], subfiletype=1, **opts)
        else:  # pyvips/HEST style: one page per level
            tw.write(img, resolution=res, resolutionunit="CENTIMETER", **opts)
            for d in (2, 4):
                tw.write(img[::d, ::d], **opts)


def test_identity_crop_is_exact():
    img = _gradient_image()
    a = _adata([[100, 80], [250, 150]], img)
    p = ss.pp.extract_patches(a, patch_size=32, mpp=1.0)
    assert p.images.shape == (2, 32, 32, 3) and p.images.dtype == np.uint8
    np.testing.assert_array_equal(p.images[0], img[80 - 16 : 80 + 16, 100 - 16 : 100 + 16])
    np.testing.assert_array_equal(p.images[1], img[150 - 16 : 150 + 16, 250 - 16 : 250 + 16])
    np.testing.assert_allclose(p.coords, [[84, 64], [234, 134]])
    np.testing.assert_array_equal(p.coverage, [1.0, 1.0])


def test_physical_size_and_resampling():
    """At 2 µm/px source and 1 µm/px target, a 40 px patch covers 20 source pixels: x grows by 0.5 per pixel."""
    img = _gradient_image()
    a = _adata([[100.0, 100.0]], img, mpp=2.0)
    p = ss.pp.extract_patches(a, patch_size=40, mpp=1.0)
    red = p.images[0, 20, :, 0].astype(float)
    slope = np.polyfit(np.arange(40)[5:-5], red[5:-5], 1)[0]
    assert slope == pytest.approx(0.5, abs=0.02)
    # the patch centre is the spot centre (between source pixels 99 and 100 → value ≈ 99.5 ± 0.5)
    assert abs(red[19:21].mean() - 99.5) <= 0.6


def test_coverage_and_edge_policies(caplog):
    img = _gradient_image(100, 100)
    a = _adata([[50, 50], [0, 50], [-100, -100]], img)  # inside, half outside, entirely outside
    corners, side = patch_windows(a.obsm["spatial"], patch_size=20, mpp=1.0, source_mpp=1.0)
    np.testing.assert_allclose(window_coverage(corners, side, (100, 100)), [1.0, 0.5, 0.0])
    with caplog.at_level(logging.WARNING, logger="spade_sc"):
        p = ss.pp.extract_patches(a, patch_size=20, mpp=1.0, edge="pad", fill=7)
    assert "reach beyond the image" in caplog.text
    assert len(p) == 3
    assert (p.images[1][:, :10] == 7).all() and (p.images[1][:, 12:] != 7).any()
    assert (p.images[2] == 7).all()
    m = ss.pp.extract_patches(a, patch_size=20, mpp=1.0, edge="mask", min_coverage=0.6)
    assert list(m.obs_names) == ["spot0"]
    with pytest.raises(ValueError, match="reach beyond the image"):
        ss.pp.extract_patches(a, patch_size=20, mpp=1.0, edge="raise")


def test_jpeg_reader_levels(tmp_path):
    from PIL import Image

    img = _gradient_image(256, 320)
    path = tmp_path / "he.jpg"
    Image.fromarray(img).save(path, quality=95)
    r = open_image(path)
    assert isinstance(r, PILReader)
    assert r.level_shapes[:3] == [(256, 320), (128, 160), (64, 80)]
    full = r.read_region(0, 0, 0, 320, 256)
    assert np.abs(full.astype(int) - img).mean() < 3  # JPEG loss only
    half = r.read_region(1, 0, 0, 160, 128)
    assert half.shape == (128, 160, 3)
    assert np.abs(half[10:-10, 10:-10, 0].astype(int) - img[21:-19:2, 21:-19:2, 0]).mean() < 4
    # a 4× coarser target picks the 1/4 level
    assert choose_level(r, 1.0, 4.0) == 2 and choose_level(r, 1.0, 1.0) == 0


@pytest.mark.parametrize("subifds", [True, False])
def test_pyramidal_tiff_reads_levels_and_regions(tmp_path, subifds):
    img = _gradient_image(256, 320)
    path = tmp_path / "wsi.tif"
    _write_pyramid(path, img, 0.25, subifds=subifds)
    r = open_image(path)
    assert isinstance(r, TiffReader)
    assert r.level_shapes == [(256, 320), (128, 160), (64, 80)]
    assert r.embedded_mpp() == pytest.approx(0.25)
    np.testing.assert_array_equal(r.read_region(0, 10, 20, 30, 15), img[20:35, 10:40])
    np.testing.assert_array_equal(r.read_region(1, 5, 6, 7, 8), img[::2, ::2][6:14, 5:12])
    # region partly outside: padded with the fill value
    reg = r.read_region(2, -3, -2, 10, 10, fill=0)
    assert (reg[:2] == 0).all() and (reg[:, :3] == 0).all()
    np.testing.assert_array_equal(reg[2:, 3:], img[::4, ::4][:8, :7])
    # 0.25 µm/px source, 0.5 µm/px target → level 1; 1.0 → level 2
    assert (
        choose_level(r, 0.25, 0.5) == 1
        and choose_level(r, 0.25, 1.0) == 2
        and choose_level(r, 0.25, 0.3) == 0
    )
    r.close()


def test_patch_from_tiff_level_matches_array_crop(tmp_path):
    """Cropping at 0.5 µm/px from a 0.25 µm/px pyramid reads level 1 and equals the crop of that level."""
    img = _gradient_image(256, 320)
    path = tmp_path / "wsi.tif"
    _write_pyramid(path, img, 0.25, subifds=False)
    a = _adata([[160, 128]], None)
    p = ss.pp.extract_patches(a, image=str(path), patch_size=32, mpp=0.5)  # mpp from the TIFF tags
    lvl1 = img[::2, ::2]
    np.testing.assert_array_equal(p.images[0], lvl1[64 - 16 : 64 + 16, 80 - 16 : 80 + 16])


def test_multiple_libraries_use_their_own_image():
    img1 = np.zeros((64, 64, 3), np.uint8)
    img2 = np.full((64, 64, 3), 200, np.uint8)
    a = _adata([[32, 32], [32, 32]])
    a.obs["library_id"] = ["a", "b"]
    a.uns["spatial"] = {
        lib: {"images": {"hires": im}, "scalefactors": {"microns_per_pixel": 1.0}}
        for lib, im in (("a", img1), ("b", img2))
    }
    p = ss.pp.extract_patches(a, patch_size=8, mpp=1.0)
    assert (p.images[0] == 0).all() and (p.images[1] == 200).all()
    del a.obs["library_id"]
    with pytest.raises(KeyError, match="library_key"):
        ss.pp.extract_patches(a, patch_size=8, mpp=1.0)


def test_scaled_image_uses_scale_factor():
    """A hires image at scale 0.5 of full resolution: centres are scaled and the source µm/px doubles."""
    img = _gradient_image(200, 200)
    a = _adata([[200.0, 100.0]], None)  # full-resolution coordinates
    a.uns["spatial"] = {
        "s": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 0.5, "microns_per_pixel": 0.5},
        }
    }
    p = ss.pp.extract_patches(a, patch_size=16, mpp=1.0)  # 1 µm/px = hires pixels
    np.testing.assert_array_equal(p.images[0], img[50 - 8 : 50 + 8, 100 - 8 : 100 + 8])


def test_missing_pixel_size_and_bad_input_errors():
    img = _gradient_image(50, 50)
    a = _adata([[25, 25]], None)
    with pytest.raises(ValueError, match="source_mpp"):
        ss.pp.extract_patches(a, image=img, patch_size=8)
    with pytest.raises(ValueError, match="uns\\['spatial'\\]"):
        ss.pp.extract_patches(a, patch_size=8)
    with pytest.raises(ValueError, match="edge"):
        ss.pp.extract_patches(a, image=img, source_mpp=1.0, edge="wrap")
    b = _adata([[25, 25]], img)
    del b.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial_key"):
        ss.pp.extract_patches(b, patch_size=8)


def test_patches_h5_roundtrip_in_hest_layout(tmp_path):
    import h5py

    img = _gradient_image()
    a = _adata([[100, 80], [250, 150], [200, 200]], img)
    p = ss.pp.extract_patches(a, patch_size=24, mpp=1.0)
    path = p.to_h5(tmp_path / "patches" / "s1.h5")
    with h5py.File(path, "r") as f:
        assert set(f) == {"img", "coords", "barcode"}
        assert f["img"].shape == (3, 24, 24, 3) and f["img"].dtype == np.uint8
        assert f["coords"].shape == (3, 2) and f["barcode"].shape == (3, 1)
        assert f["barcode"][1, 0] == b"spot1"
    q = ss.pp.Patches.from_h5(path)
    assert list(q.obs_names) == ["spot0", "spot1", "spot2"]
    np.testing.assert_array_equal(q[[2, 0]], p.images[[2, 0]])
    np.testing.assert_array_equal(q[[1, 1]], p.images[[1, 1]])
    np.testing.assert_array_equal(q.coords, [[88, 68], [238, 138], [188, 188]])


def test_spatialdata_image_source():
    img = _gradient_image(120, 160)
    a = _adata([[40, 30], [100, 60]], img, mpp=1.0)
    sdata = ss.io.to_spatialdata(a)
    p = ss.pp.extract_patches(sdata, patch_size=16, mpp=1.0, table_key="table")
    np.testing.assert_array_equal(p.images[1], img[60 - 8 : 60 + 8, 100 - 8 : 100 + 8])
    # without obsm['spatial'] the spots come from the circles element
    del sdata.tables["table"].obsm["spatial"]
    q = ss.pp.extract_patches(sdata, patch_size=16, mpp=1.0)
    np.testing.assert_array_equal(q.images, p.images)


def test_array_reader_channels_first_and_dtypes():
    img = _gradient_image(40, 50)
    r = ArrayReader([np.moveaxis(img, -1, 0)])
    np.testing.assert_array_equal(r.read_region(0, 3, 4, 5, 6), img[4:10, 3:8])
    r16 = ArrayReader([img.astype(np.uint16) * 257])
    np.testing.assert_array_equal(r16.read_region(0, 0, 0, 5, 5), img[:5, :5])
    with pytest.raises(TypeError, match="RGB uint8"):
        ArrayReader([img.astype(np.int32) * 1000]).read_region(0, 0, 0, 5, 5)
    crop = crop_patch(r, 0, (10.0, 10.0), 8.0, 8)
    np.testing.assert_array_equal(crop, img[10:18, 10:18])


def test_patch_corners_are_in_spot_coordinates_for_scaled_images():
    img = _gradient_image(200, 200)
    a = _adata([[200.0, 100.0]], None)
    a.uns["spatial"] = {
        "s": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 0.5, "microns_per_pixel": 0.5},
        }
    }
    p = ss.pp.extract_patches(a, patch_size=16, mpp=1.0)  # 16 hires px = 32 full-resolution px
    np.testing.assert_allclose(p.coords, [[200 - 16, 100 - 16]])
