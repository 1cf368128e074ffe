"""Features and expression out of core (memmap, zarr, dask, h5py, AnnData backed mode), same results."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import spade_sc as ss
from spade_sc.model._data import ExpressionSource, take_rows

FIT_KW = dict(n_prototypes=6, n_experts=3, max_epochs=2, proj_dim=8, batch_size=32, device="cpu")


@pytest.fixture(scope="module")
def base():
    a = ss.datasets.toy(random_state=1, n_slides=3, grid=10)
    a.X = sp.csr_matrix(a.layers["counts"], dtype=np.float32)
    del a.layers["counts"]
    return a


def _weights(model):
    return {k: v.clone() for k, v in model.pairs_.state_dict().items()}


def _assert_same(m1, m2, **tol):
    for (k, a), b in zip(_weights(m1).items(), _weights(m2).values(), strict=True):
        torch.testing.assert_close(b, a, msg=k, **tol)


def test_memmap_features_and_memmapped_csr_equal_in_memory(base, tmp_path):
    ref = base.copy()
    m_ref = ss.tl.fit_spade(ref, **FIT_KW)

    a = base.copy()
    feats = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=a.obsm["X_image"].shape)
    feats[:] = a.obsm["X_image"]
    feats.flush()
    a.obsm["X_image"] = np.load(tmp_path / "f.npy", mmap_mode="r")
    x = a.X
    for name in ("data", "indices", "indptr"):
        np.save(tmp_path / f"{name}.npy", getattr(x, name))
    arrays = [np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("data", "indices", "indptr")]
    a.X = sp.csr_matrix(tuple(arrays), shape=x.shape, copy=False)
    assert np.shares_memory(a.X.data, arrays[0])  # the matrix stays on disk (memory-mapped)
    model = ss.tl.fit_spade(a, **FIT_KW)
    _assert_same(m_ref, model, rtol=0, atol=0)
    e1, _ = m_ref.get_embedding(ref)
    e2, _ = model.get_embedding(a)
    np.testing.assert_array_equal(e1, e2)


def test_zarr_features_and_dask_expression_equal_in_memory(base, tmp_path):
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    ref = base.copy()
    ref.X = ref.X.toarray()  # dense in memory: the same (dense) minibatch path as the dask matrix
    m_ref = ss.tl.fit_spade(ref, **FIT_KW)

    a = base.copy()
    zf = zarr.open_array(str(tmp_path / "f.zarr"), mode="w", shape=a.obsm["X_image"].shape, chunks=(64, 64),
                         dtype="float32")
    zf[:] = a.obsm["X_image"]
    zx = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=a.shape, chunks=(64, 100), dtype="float32")
    zx[:] = a.X.toarray()
    a.obsm["X_image"] = zf
    a.X = da.from_zarr(zx)
    model = ss.tl.fit_spade(a, **FIT_KW)
    _assert_same(m_ref, model, rtol=1e-5, atol=1e-6)
    assert isinstance(a.obsm["X_image"], zarr.Array)  # still out of core after the fit
    e1, w1 = m_ref.get_embedding(ref)
    e2, w2 = model.get_embedding(a)
    np.testing.assert_allclose(e2, e1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w2, w1, rtol=1e-5, atol=1e-7)
    x1, _ = m_ref.get_embedding(ref, modality="expression")
    x2, _ = model.get_embedding(a, modality="expression")
    np.testing.assert_allclose(x2, x1, rtol=1e-5, atol=1e-6)


def test_backed_h5ad_expression(base, tmp_path):
    import anndata as ad

    a = base.copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    assert not sp.issparse(backed.X)  # a sparse dataset on disk
    src = ExpressionSource(backed.X, np.arange(a.n_vars))
    mem = ExpressionSource(a.X, np.arange(a.n_vars))
    idx = np.array([5, 0, 299, 5, 17])
    np.testing.assert_array_equal(src.rows(idx), mem.rows(idx))
    np.testing.assert_allclose(src.scale, mem.scale)
    rows = np.array([5, -1, 17, 5])
    for p, q in zip(src.sparse_rows(rows), mem.sparse_rows(rows), strict=True):
        np.testing.assert_array_equal(p, q)
    backed.file.close()


def test_take_rows_h5py_unsorted(tmp_path):
    import h5py

    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "x.h5", "r") as f:
        idx = np.array([7, 2, 2, 9, 0])
        np.testing.assert_array_equal(take_rows(f["x"], idx), x[idx])


def test_out_of_core_nan_is_reported(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = ss.datasets.toy(random_state=1, n_slides=3, grid=10)
    f = a.obsm["X_image"].astype(np.float32)
    f[11, 3] = np.nan
    z = zarr.open_array(str(tmp_path / "f.zarr"), mode="w", shape=f.shape, chunks=(50, 64), dtype="float32")
    z[:] = f
    a.obsm["X_image"] = z
    with pytest.raises(ValueError, match="NaN or infinite values in 1 spots"):
        ss.tl.fit_spade(a, **FIT_KW)
