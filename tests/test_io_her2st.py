"""her2st reader and the pooch registry, on the real shared data (skipped when absent)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

import spade_sc as ss


def _copying_downloader(source_dir, calls=None):
    """A pooch downloader that copies ``…/data/<relpath>`` from ``source_dir`` instead of using the network."""

    def download(url, output_file, pooch, check_only=False):
        rel = url.split("/data/", 1)[1]
        if calls is not None:
            calls.append(rel)
        shutil.copyfile(source_dir / rel, output_file)

    return download


def test_read_her2st_section(her2st_dir):
    a = ss.io.read_her2st(her2st_dir, "C2")
    spots = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    assert a.n_obs == len(spots) == 187 and a.n_vars == 15706
    assert a.X.dtype == np.float32 and float(a.X.sum()) == float(a.layers["counts"].sum())
    # one spot, checked against the raw files
    counts = pd.read_csv(her2st_dir / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    key = counts.index[5]
    row = spots[(spots["x"].astype(str) + "x" + spots["y"].astype(str)) == key].iloc[0]
    i = list(a.obs_names).index(f"C2_{key}")
    np.testing.assert_allclose(a.obsm["spatial"][i], [row["pixel_x"], row["pixel_y"]])
    np.testing.assert_array_equal(a.X[i].toarray().ravel(), counts.loc[key].to_numpy())
    # µm/px from the 200 µm pitch, checked with the distances of spots one array position apart
    mpp = a.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"]
    assert 0.68 < mpp < 0.70
    pos = {(x, y): i for i, (x, y) in enumerate(zip(a.obs["array_x"], a.obs["array_y"]))}
    steps = [np.linalg.norm(a.obsm["spatial"][pos[(x + 1, y)]] - a.obsm["spatial"][i])
             for (x, y), i in pos.items() if (x + 1, y) in pos]  # fmt: skip
    steps += [np.linalg.norm(a.obsm["spatial"][pos[(x, y + 1)]] - a.obsm["spatial"][i])
              for (x, y), i in pos.items() if (x, y + 1) in pos]  # fmt: skip
    assert len(steps) > 100
    assert np.median(steps) * mpp == pytest.approx(200.0, rel=0.01)
    sf = a.uns["spatial"]["C2"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100 / mpp)
    hires = a.uns["spatial"]["C2"]["images"]["hires"]
    assert max(hires.shape[:2]) == 2000 and hires.shape[1] == round(9274 * sf["tissue_hires_scalef"])


def test_read_her2st_drops_spots_without_counts(her2st_dir, tmp_path):
    import anndata as ad

    a = ss.io.read_her2st(her2st_dir, "C3", load_image=False)
    assert a.n_obs == 180  # 182 selected spots, 2 without counts
    a.write_h5ad(tmp_path / "c3.h5ad")
    b = ad.read_h5ad(tmp_path / "c3.h5ad")
    assert b.uns["spatial"]["C3"]["metadata"] == a.uns["spatial"]["C3"]["metadata"]
    assert (b.X != a.X).nnz == 0
    assert "hires" not in a.uns["spatial"]["C3"]["images"]
    with pytest.raises(FileNotFoundError, match="almaan/her2st"):
        ss.io.read_her2st(her2st_dir, "C9")


def test_datasets_her2st_fetches_with_sha256(her2st_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ss.settings, "datadir", tmp_path / "cache")
    calls = []
    a = ss.datasets.her2st("C6", downloader=_copying_downloader(her2st_dir, calls), load_image=False)
    assert sorted(calls) == [
        "ST-cnts/C6.tsv.gz",
        "ST-imgs/C/C6/5714_HE_BT_E2.jpg",
        "ST-spotfiles/C6_selection.tsv",
    ]
    assert (tmp_path / "cache" / "her2st" / "ST-imgs" / "C" / "C6" / "5714_HE_BT_E2.jpg").is_file()
    ref = ss.io.read_her2st(her2st_dir, "C6", load_image=False)
    assert a.n_obs == ref.n_obs == 178
    np.testing.assert_array_equal(a.obsm["spatial"], ref.obsm["spatial"])
    # cached: no second download
    ss.datasets.her2st("C6", downloader=_copying_downloader(her2st_dir, calls), load_image=False)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="section"):
        ss.datasets.her2st("D1")


def test_datasets_her2st_rejects_a_corrupted_download(her2st_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ss.settings, "datadir", tmp_path / "cache")

    def corrupt(url, output_file, pooch, check_only=False):
        with open(output_file, "wb") as f:
            f.write(b"not the file")

    with pytest.raises(ValueError, match="(?i)hash"):
        ss.datasets.her2st("C2", downloader=corrupt)


def test_extract_features_on_real_section(her2st_dir):
    """224 px at 0.5 µm/px resampled from ~0.688 µm/px, a few spots, offline EfficientNet-Lite0."""
    a = ss.io.read_her2st(her2st_dir, "C4", load_image=False)[:6].copy()
    reader = ss.pp.open_image(a.uns["spatial"]["C4"]["metadata"]["source_image_path"])  # decoded once, reused
    patches = ss.pp.extract_patches(a, image=reader)
    assert patches.images.shape == (6, 224, 224, 3)
    # independent check: the patch covers 112 µm around the spot → same mean colour as the direct crop
    mpp = a.uns["spatial"]["C4"]["scalefactors"]["microns_per_pixel"]
    half = 224 * 0.5 / mpp / 2  # 112 µm side
    cx, cy = a.obsm["spatial"][0]
    x0, y0 = round(cx - half), round(cy - half)
    crop = reader.read_region(0, x0, y0, round(cx + half) - x0, round(cy + half) - y0)
    np.testing.assert_allclose(
        patches.images[0].reshape(-1, 3).mean(0), crop.reshape(-1, 3).mean(0), atol=2.0
    )
    ss.pp.extract_features(a, model="efficientnet_lite0", image=reader, batch_size=6)
    x = a.obsm["X_image"]
    assert x.shape == (6, 1280) and np.isfinite(x).all() and x.std(0).mean() > 0
    assert a.uns["spade_features"]["params"]["source_mpp"] == [pytest.approx(mpp)]
