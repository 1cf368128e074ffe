"""HEST-1k reader on a tiny directory written in the published layout, and SPADE's sample selection."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spade_sc as ss

MPP = 0.25  # µm/px of the tiny WSIs: level 1 of the pyramid is exactly HEST's 0.5 µm/px
SIDE0 = int(224 * 0.5 / MPP)  # 448 full-resolution pixels per 224 px patch


def _wsi(rng, h=1024, w=1280):
    """Smooth random colours (so neighbouring patches differ) as uint8 RGB."""
    from scipy.ndimage import zoom

    coarse = rng.integers(0, 256, (h // 64, w // 64, 3)).astype(float)
    return np.clip(zoom(coarse, (64, 64, 1), order=1), 0, 255).astype(np.uint8)


def _write_pyramid(path, img):
    """Generic pyramidal TIFF as HEST ships it: tiled JPEG-free pages, one per level, with resolution tags."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for d in (1, 2, 4):
            tw.write(img[::d, ::d], tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(1e4 / (MPP * d), 1e4 / (MPP * d)), resolutionunit="CENTIMETER")  # fmt: skip


def _meta_row(sid, **kw):
    row = {
        "dataset_title": "tiny", "id": sid, "image_filename": f"{sid}.tif", "organ": "Breast",
        "disease_state": "Cancer", "oncotree_code": "IDC", "species": "Homo sapiens", "patient": None,
        "st_technology": "Visium", "data_publication_date": "1/1/24", "license": "CC BY 4.0", "study_link": "",
        "download_page_link1": "", "inter_spot_dist": 100.0, "spot_diameter": 55.0, "spots_under_tissue": 6,
        "preservation_method": "FFPE", "nb_genes": 18000, "treatment_comment": None,
        "pixel_size_um_embedded": MPP, "pixel_size_um_estimated": MPP, "magnification": "40x",
        "fullres_px_width": 1280, "fullres_px_height": 1024, "tissue": "Breast", "disease_comment": "",
        "subseries": "", "hest_version_added": "v1_0_0",
    }  # fmt: skip
    row.update(kw)
    return row


def make_hest(root, *, ensembl_sample=True):
    """Write a tiny HEST-1k download: st/, wsis/, patches/, metadata/, HEST_v1_1_0.csv (no tissue_seg/)."""
    import anndata as ad
    import h5py
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("st", "wsis", "patches", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = ["TENX01", "NCBI02"]
    rows = []
    genes = [f"GENE{i}" for i in range(30)]
    for k, sid in enumerate(ids):
        img = _wsi(rng)
        _write_pyramid(root / "wsis" / f"{sid}.tif", img)
        # 6 spots, even integer centres (so patches are exact crops of pyramid level 1)
        cx = np.array([300, 500, 700, 900, 400, 800]) + 40 * k
        cy = np.array([300, 300, 500, 500, 700, 700])
        barcodes = [f"AAACAAGTATCTCCCA-{i}" for i in range(6)]
        x = sp.csr_matrix(rng.poisson(2.0, (6, len(genes))).astype(np.float32))
        var = pd.DataFrame(index=genes)
        if k == 1 and ensembl_sample:  # a sample with Ensembl ids as var_names (a known HEST pitfall)
            var = pd.DataFrame({"gene_symbols": genes}, index=[f"ENSG{100000 + i:011d}" for i in range(30)])
        obs = pd.DataFrame(
            {"in_tissue": 1, "pxl_col_in_fullres": cx, "pxl_row_in_fullres": cy,
             "array_col": np.arange(6) * 2, "array_row": np.arange(6) % 2},
            index=barcodes,
        )  # fmt: skip
        a = ad.AnnData(X=x, obs=obs, var=var)
        a.obsm["spatial"] = np.c_[cx, cy].astype(np.int64)
        scalef = 0.1
        thumb = np.asarray(Image.fromarray(img).resize((128, 102)))
        a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": thumb},
                                   "scalefactors": {"tissue_downscaled_fullres_scalef": scalef,
                                                    "spot_diameter_fullres": 55.0 / MPP}, "metadata": {}}}  # fmt: skip
        a.write_h5ad(root / "st" / f"{sid}.h5ad")
        # patches/{id}.h5 as HEST writes them: 224 px at 0.5 µm/px, coords = top-left corners (level 0)
        lvl1 = img[::2, ::2]
        top_left = np.c_[cx, cy] - SIDE0 // 2
        imgs = np.stack([lvl1[(y // 2) : (y // 2) + 224, (x_ // 2) : (x_ // 2) + 224] for x_, y in top_left])
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f.create_dataset("img", data=imgs, chunks=(1, 224, 224, 3))
            f["img"].attrs["patch_size_target"] = 224
            f.create_dataset("coords", data=top_left)
            f.create_dataset("barcode", data=np.array([b.encode() for b in barcodes])[:, None])
        row = _meta_row(sid)
        (root / "metadata" / f"{sid}.json").write_text(json.dumps(row))
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "HEST_v1_1_0.csv", index=False)
    return ids


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    make_hest(root)
    return root


def _mean_colour(batch):
    return batch.reshape(len(batch), -1, 3).mean(1)


def test_read_hest_anndata(hest_root):
    adata = ss.io.read_hest(hest_root, "TENX01")
    assert adata.n_obs == 6 and sp.issparse(adata.X)
    np.testing.assert_allclose(adata.obsm["spatial"], adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    entry = adata.uns["spatial"]["TENX01"]
    assert entry["scalefactors"]["microns_per_pixel"] == MPP
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55 / MPP)
    assert entry["images"]["downscaled_fullres"].shape == (102, 128, 3)
    assert entry["metadata"]["source_image_path"].endswith("wsis/TENX01.tif")
    assert entry["metadata"]["patches_path"].endswith("patches/TENX01.h5")
    assert entry["metadata"]["organ"] == "Breast"
    assert (adata.obs["library_id"] == "TENX01").all()
    both = ss.io.read_hest(hest_root)
    assert set(both) == {"TENX01", "NCBI02"}


def test_read_hest_writes_and_reads_back(hest_root, tmp_path):
    import anndata as ad

    a = ss.io.read_hest(hest_root, "NCBI02")
    a.write_h5ad(tmp_path / "s.h5ad")
    b = ad.read_h5ad(tmp_path / "s.h5ad")
    assert b.uns["spatial"]["NCBI02"]["metadata"] == a.uns["spatial"]["NCBI02"]["metadata"]
    assert b.uns["spatial"]["NCBI02"]["scalefactors"]["microns_per_pixel"] == MPP
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.var["gene_ids"][:1]) == ["ENSG00000100000"]


def test_ensembl_gene_names_are_replaced_by_symbols(hest_root):
    a = ss.io.read_hest(hest_root, "NCBI02")
    assert list(a.var_names[:2]) == ["GENE0", "GENE1"]
    assert a.var["gene_ids"].iloc[0] == "ENSG00000100000"


def test_ensembl_without_symbols_warns(tmp_path, caplog):
    import anndata as ad

    root = tmp_path / "h"
    make_hest(root)
    a = ad.read_h5ad(root / "st" / "NCBI02.h5ad")
    del a.var["gene_symbols"]
    a.write_h5ad(root / "st" / "NCBI02.h5ad")
    with caplog.at_level(logging.WARNING, logger="spade_sc"):
        b = ss.io.read_hest(root, "NCBI02")
    assert "Ensembl ids" in caplog.text and b.var_names[0].startswith("ENSG")


def test_missing_optional_folders_and_metadata_from_csv(tmp_path, caplog):
    import shutil

    root = tmp_path / "h"
    make_hest(root)
    shutil.rmtree(root / "wsis")
    shutil.rmtree(root / "patches")
    (root / "metadata" / "TENX01.json").unlink()  # falls back to the HEST_v*.csv row
    with caplog.at_level(logging.WARNING, logger="spade_sc"):
        a = ss.io.read_hest(root, "TENX01")
    assert "no wsis/TENX01.tif" in caplog.text
    md = a.uns["spatial"]["TENX01"]["metadata"]
    assert "source_image_path" not in md and "patches_path" not in md
    assert a.uns["spatial"]["TENX01"]["scalefactors"]["microns_per_pixel"] == MPP
    # without the WSI, patches come from the downscaled image (scale factor 0.1 → 2.5 µm/px)
    p = ss.pp.extract_patches(a, patch_size=8, mpp=2.5)
    assert p.images.shape == (6, 8, 8, 3)
    with pytest.raises(FileNotFoundError, match="st/"):
        ss.io.read_hest(root, "NOPE")


def test_patch_corners_versus_spot_centres(hest_root):
    adata = ss.io.read_hest(hest_root, "TENX01")
    patches = ss.io.read_hest_patches(hest_root, "TENX01")
    assert len(patches) == 6 and patches.patch_size == 224 and patches.mpp == 0.5
    centres = patches.coords + SIDE0 // 2
    np.testing.assert_allclose(centres, adata[patches.obs_names].obsm["spatial"])


def test_features_from_wsi_equal_features_from_hest_patches(hest_root):
    """Cropping 224 px at 0.5 µm/px from the WSI (pyramid level 1) reproduces HEST's patch files exactly."""
    a = ss.io.read_hest(hest_root, "TENX01")
    b = a.copy()
    ss.pp.extract_features(a, model=_mean_colour)  # from the pyramidal WSI
    ss.pp.extract_features(
        b, model=_mean_colour, patches=b.uns["spatial"]["TENX01"]["metadata"]["patches_path"]
    )
    np.testing.assert_allclose(a.obsm["X_image"], b.obsm["X_image"], rtol=1e-6)
    assert a.uns["spade_features"]["params"]["source_mpp"] == [MPP]
    p_wsi = ss.pp.extract_patches(a)
    p_h5 = ss.io.read_hest_patches(hest_root, "TENX01")
    np.testing.assert_array_equal(p_wsi.images, p_h5[np.arange(6)])
    np.testing.assert_allclose(p_wsi.coords, p_h5.coords)


def test_read_hest_as_spatialdata(hest_root):
    sdata = ss.io.read_hest(hest_root, "TENX01", as_spatialdata=True)
    assert set(sdata.images) == {"TENX01_image"} and set(sdata.shapes) == {"TENX01_spots"}
    img = sdata.images["TENX01_image"]
    assert sorted(img.children) == ["scale0", "scale1", "scale2"]
    assert type(img["scale0"]["image"].data).__name__ == "Array"  # dask: the WSI is read lazily
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] in ("TENX01_spots", ["TENX01_spots"])
    circles = sdata.shapes["TENX01_spots"]
    np.testing.assert_allclose(circles["radius"], 55 / MPP / 2)
    ss.pp.extract_features(sdata, model=_mean_colour, table_key="table")
    ref = ss.io.read_hest(hest_root, "TENX01")
    ss.pp.extract_features(ref, model=_mean_colour)
    np.testing.assert_allclose(table.obsm["X_image"], ref.obsm["X_image"], rtol=1e-6)
    back = ss.io.to_anndata(sdata)
    np.testing.assert_allclose(back.obsm["spatial"], ref.obsm["spatial"])


def test_select_hest_samples_rules():
    rows = [
        _meta_row("A"),
        _meta_row("B", organ="Brain"),
        _meta_row("C", species="Mus musculus"),
        _meta_row("D", st_technology="Xenium"),
        _meta_row("E", nb_genes=10000),
        _meta_row("INT17"),
        _meta_row("F", hest_version_added="v1_1_0"),
        _meta_row("G", organ="Kidney/Brain"),
        _meta_row("H", organ="Lung", nb_genes=10001),
    ]
    sel = ss.io.select_hest_samples(pd.DataFrame(rows))
    assert list(sel["id"]) == ["A", "H"]
    assert list(ss.io.select_hest_samples(pd.DataFrame(rows), query="organ == 'Lung'")["id"]) == ["H"]
    assert len(ss.io.select_hest_samples(pd.DataFrame(rows), preset=None)) == len(rows)
    with pytest.raises(ValueError, match="preset"):
        ss.io.select_hest_samples(pd.DataFrame(rows), preset="uni")
    with pytest.raises(KeyError, match="lacks columns"):
        ss.io.select_hest_samples(pd.DataFrame({"id": ["A"]}))


def test_select_hest_samples_on_the_published_table():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "hest" / "HEST_v1_1_0.csv"
    if not path.is_file():
        pytest.skip("HEST_v1_1_0.csv not present in ../shared/data")
    sel = ss.io.select_hest_samples(path, preset="spade")
    assert len(sel) == 293
    assert sel["organ"].nunique() == 15
    assert int(sel["spots_under_tissue"].sum()) == 627_688
