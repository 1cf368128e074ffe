"""read_visium on a tiny Space Ranger output written here; SpatialData ↔ AnnData conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

import spade_sc as ss

SPOT_PX = 110.0  # spot_diameter_fullres → 55 µm / 110 px = 0.5 µm/px


def make_spaceranger(root, *, header: bool = False):
    """Space Ranger ``outs/``: filtered_feature_bc_matrix.h5 (10x v3 HDF5) + spatial/ (positions, scale factors,
    hires/lowres PNG) and a full-resolution TIFF beside it."""
    import h5py
    import scipy.sparse as sp
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "spatial").mkdir(parents=True)
    n_spots, n_genes = 8, 12
    barcodes = [f"AAACAAGTATCTCC{i:02d}-1" for i in range(n_spots)]
    genes = [f"G{i}" for i in range(n_genes - 1)] + ["G0"]  # a duplicated symbol
    counts = sp.csc_matrix(rng.poisson(3.0, (n_genes, n_spots)).astype(np.int32))
    with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = np.array([b"tiny_visium"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["software_version"] = "spaceranger-2.0.0"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=counts.data)
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([n_genes, n_spots], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * n_genes))
        feat.create_dataset("id", data=np.array([f"ENSG{i:011d}".encode() for i in range(n_genes)]))
        feat.create_dataset("name", data=np.array([g.encode() for g in genes]))
    full = rng.integers(0, 256, (800, 1000, 3), dtype=np.uint8)
    tifffile.imwrite(root / "image.tif", full, photometric="rgb")
    rows, cols = (
        np.array([200, 200, 300, 300, 400, 400, 500, 600]),
        np.array([200, 400, 300, 500, 200, 600, 700, 800]),
    )
    lines = [f"{b},1,{i // 4},{i % 4},{r},{c}" for i, (b, r, c) in enumerate(zip(barcodes, rows, cols))]
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    head = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"] if header else []
    (root / "spatial" / name).write_text("\n".join(head + lines) + "\n")
    sf = {"spot_diameter_fullres": SPOT_PX, "tissue_hires_scalef": 0.5, "fiducial_diameter_fullres": 170.0,
          "tissue_lowres_scalef": 0.1}  # fmt: skip
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    Image.fromarray(full[::2, ::2]).save(root / "spatial" / "tissue_hires_image.png")
    Image.fromarray(full[::10, ::10]).save(root / "spatial" / "tissue_lowres_image.png")
    return full, np.c_[cols, rows].astype(float)


@pytest.mark.parametrize("header", [False, True])
def test_read_visium(tmp_path, header):
    full, xy = make_spaceranger(tmp_path, header=header)
    a = ss.io.read_visium(tmp_path, source_image_path=tmp_path / "image.tif")
    assert a.n_obs == 8 and a.n_vars == 12 and a.var_names.is_unique
    np.testing.assert_allclose(a.obsm["spatial"], xy)  # (x, y) = (pxl_col, pxl_row)
    lib = a.obs["library_id"].iloc[0]
    entry = a.uns["spatial"][lib]
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(55.0 / SPOT_PX)
    assert entry["metadata"]["source_image_path"].endswith("image.tif")
    # 32 px at 0.5 µm/px from the full-resolution image = an exact crop
    p = ss.pp.extract_patches(a, patch_size=32, mpp=0.5)
    x, y = xy[0].astype(int)
    np.testing.assert_array_equal(p.images[0], full[y - 16 : y + 16, x - 16 : x + 16])
    # the hires PNG (scale 0.5 → 1 µm/px) gives the same crop at half resolution
    q = ss.pp.extract_patches(a, patch_size=16, mpp=1.0, image_key="hires")
    np.testing.assert_array_equal(
        q.images[0], full[::2, ::2][y // 2 - 8 : y // 2 + 8, x // 2 - 8 : x // 2 + 8]
    )


def test_read_visium_without_images_and_errors(tmp_path):
    import h5py

    _, xy = make_spaceranger(tmp_path)
    a = ss.io.read_visium(tmp_path, load_images=False)
    np.testing.assert_allclose(a.obsm["spatial"], xy)
    assert list(a.uns["spatial"]) == ["tiny_visium"]
    with h5py.File(tmp_path / "filtered_feature_bc_matrix.h5", "a") as f:
        del f.attrs["library_ids"]
    b = ss.io.read_visium(tmp_path, load_images=False)
    assert list(b.uns["spatial"]) == [tmp_path.name]
    assert a.uns["spatial"][a.obs["library_id"].iloc[0]]["scalefactors"]["microns_per_pixel"] == 0.5
    with pytest.raises(FileNotFoundError, match="counts_file"):
        ss.io.read_visium(tmp_path, counts_file="raw_feature_bc_matrix.h5")


def test_visium_spatialdata_roundtrip(tmp_path):
    make_spaceranger(tmp_path)
    sdata = ss.io.read_visium(tmp_path, source_image_path=tmp_path / "image.tif", as_spatialdata=True)
    table = sdata.tables["table"]
    assert "images" not in next(iter(table.uns["spatial"].values()))
    shapes = next(iter(sdata.shapes.values()))
    np.testing.assert_allclose(shapes["radius"], SPOT_PX / 2)
    back = ss.io.to_anndata(sdata)
    del back.obsm["spatial"]
    restored = ss.io.to_anndata(
        ss.io.to_spatialdata(ss.io.read_visium(tmp_path, load_images=False), images=False)
    )
    np.testing.assert_allclose(restored.obsm["spatial"], ss.io.read_visium(tmp_path).obsm["spatial"])
    with pytest.raises(TypeError, match="SpatialData"):
        ss.io.to_anndata(np.zeros(3))


def test_to_spatialdata_with_several_libraries():
    toy = ss.datasets.toy(n_slides=2, grid=3)
    sdata = ss.io.to_spatialdata(toy)
    assert set(sdata.images) == {"slide0_image", "slide1_image"}
    assert set(sdata.shapes) == {"slide0_spots", "slide1_spots"}
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(sdata.images["slide1_image"], get_all=True)) == {"slide1"}
    back = ss.io.to_anndata(sdata)
    np.testing.assert_allclose(back.obsm["spatial"], toy.obsm["spatial"])
    del toy.obs["library_id"]
    with pytest.raises(KeyError, match="library_key"):
        ss.io.to_spatialdata(toy)
