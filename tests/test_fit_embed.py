"""End-to-end: select_genes → fit_spade → embed on the toy data, keys, save/load and h5ad round trip."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spade_sc as ss

FAST = dict(n_prototypes=6, n_experts=3, max_epochs=3, batch_size=64, lr=1e-3)


@pytest.fixture(scope="module")
def fitted(small_toy_master):
    adata = small_toy_master.copy()
    ss.pp.select_genes(adata, batch_key="slide", n_top_genes=30)
    model = ss.tl.fit_spade(adata, batch_key="slide", **FAST)
    ss.tl.embed(adata, model)
    return adata, model


def test_select_genes_union_of_batch_hvgs(small_toy):
    import scanpy as sc

    ss.pp.select_genes(small_toy, batch_key="slide", n_top_genes=20)
    panel = set(small_toy.var_names[small_toy.var["spade_gene"]])
    # independent: each slide's top-20 seurat HVGs on the shared genes
    want = set()
    x = small_toy.X
    shared = np.ones(small_toy.n_vars, bool)
    for s in small_toy.obs["slide"].cat.categories:
        shared &= np.asarray((x[(small_toy.obs["slide"] == s).to_numpy()] > 0).sum(0)).ravel() > 0
    for s in small_toy.obs["slide"].cat.categories:
        sub = small_toy[(small_toy.obs["slide"] == s).to_numpy(), shared].copy()
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        sc.pp.highly_variable_genes(sub, n_top_genes=20, flavor="seurat")
        want |= set(sub.var_names[sub.var["highly_variable"]])
    assert panel == want
    assert 20 <= len(panel) <= 60


def test_fit_writes_keys(fitted):
    adata, model = fitted
    assert isinstance(adata.obs["spade_prototype"].dtype, pd.CategoricalDtype)
    assert isinstance(adata.obs["spade_expert"].dtype, pd.CategoricalDtype)
    assert set(adata.obs["spade_split"].unique()) == {"train", "val"}
    params = adata.uns["spade"]["params"]
    assert params["n_experts"] == 3 and params["batch_key"] == "slide" and "package_version" in params
    assert list(model.genes_) == list(adata.var_names[adata.var["spade_gene"]])
    # whole slides are held out for validation
    split = adata.obs.groupby("slide", observed=True)["spade_split"].nunique()
    assert (split == 1).all()
    hist = model.history_
    assert set(hist.columns) == {"epoch", "expert", "train_loss", "val_loss"} and len(hist) == 3 * 3


def test_embed_outputs(fitted):
    adata, model = fitted
    emb = adata.obsm["X_spade"]
    w = adata.obsm["spade_expert_weights"]
    assert emb.dtype == np.float32 and emb.shape == (adata.n_obs, 256)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(adata.obs["spade_expert"].to_numpy().astype(int), w.argmax(1))
    # the embedding is the weighted sum of the experts' outputs
    import torch

    x = torch.from_numpy(adata.obsm["X_image"][:5])
    outs = np.stack([model.pairs_.image.forward_expert(x, e).detach().numpy() for e in range(3)], 1)
    np.testing.assert_allclose(emb[:5], (w[:5, :, None] * outs).sum(1), atol=1e-5)


def test_hard_routing_equals_argmax_expert(fitted):
    adata, model = fitted
    emb, w = model.get_embedding(adata, tau=1e-7)
    import torch

    x = torch.from_numpy(adata.obsm["X_image"])
    top = w.argmax(1)
    for e in np.unique(top):
        rows = top == e
        want = model.pairs_.image.forward_expert(x[rows], int(e)).detach().numpy()
        np.testing.assert_allclose(emb[rows], want, atol=1e-5)


def test_expression_modality(fitted):
    adata, model = fitted
    b = adata.copy()
    ss.tl.embed(b, model, modality="expression")
    e = b.obsm["X_spade_expression"]
    assert e.shape == (b.n_obs, 256) and np.isfinite(e).all()
    # matched spots are closer in the joint space than random pairs
    img = adata.obsm["X_spade"]
    cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
    rng = np.random.default_rng(0)
    assert cos(img, e).mean() > cos(img, e[rng.permutation(len(e))]).mean()


def test_save_load_identical(fitted, tmp_path):
    adata, model = fitted
    model.save(tmp_path / "m")
    loaded = ss.SpadeModel.load(tmp_path / "m")
    for modality in ("image", "expression"):
        a, wa = model.get_embedding(adata, modality=modality)
        b, wb = loaded.get_embedding(adata, modality=modality)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(wa, wb)
    assert list(loaded.genes_) == list(model.genes_) and loaded.feature_dim_ == model.feature_dim_
    assert loaded.distance_scale_ == model.distance_scale_
    pd.testing.assert_frame_equal(loaded.history_, model.history_, check_dtype=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)


def test_h5ad_round_trip_of_every_key(fitted, tmp_path):
    adata, _ = fitted
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    for col in ("spade_prototype", "spade_expert", "spade_split"):
        pd.testing.assert_series_equal(back.obs[col], adata.obs[col])
    for key in ("X_spade", "spade_expert_weights", "X_image"):
        np.testing.assert_array_equal(back.obsm[key], adata.obsm[key])
    assert back.var["spade_gene"].equals(adata.var["spade_gene"])
    assert back.uns["spade"]["params"]["n_experts"] == adata.uns["spade"]["params"]["n_experts"]
    assert back.uns["spade"]["embed_params"]["tau"] == 0.1


def test_fit_is_reproducible(small_toy):
    a = small_toy.copy()
    m1 = ss.tl.fit_spade(a, batch_key="slide", **FAST)
    m2 = ss.tl.fit_spade(a, batch_key="slide", **FAST)
    np.testing.assert_array_equal(m1.get_embedding(a)[0], m2.get_embedding(a)[0])


def test_embed_copy_and_spatialdata(fitted):
    adata, model = fitted
    b = adata.copy()
    del b.obsm["X_spade"]
    out = ss.tl.embed(b, model, copy=True)
    assert "X_spade" not in b.obsm and "X_spade" in out.obsm
    from spatialdata import SpatialData

    sdata = SpatialData(tables={"table": b})
    ss.tl.embed(sdata, model, table_key="table")
    np.testing.assert_allclose(sdata.tables["table"].obsm["X_spade"], adata.obsm["X_spade"], atol=1e-6)
