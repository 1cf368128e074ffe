"""``tl.expression_probe``: the HEST linear probe against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import spade_sc as ss
from spade_sc.tl._probe import hest_gene_panel, pearson_columns


def _adata(feats, counts, slides=None, genes=None):
    genes = genes or [f"G{i}" for i in range(counts.shape[1])]
    obs = pd.DataFrame(index=[f"s{i}" for i in range(len(feats))])
    if slides is not None:
        obs["slide"] = slides
    a = AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["X_emb"] = feats.astype(np.float32)
    return a


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    x_tr = rng.normal(size=(12, 5))
    x_te = rng.normal(size=(10, 5))
    w = rng.normal(size=(5, 4))
    c_tr = rng.poisson(np.exp(0.5 * x_tr @ w / 3 + 1.5))
    c_te = rng.poisson(np.exp(0.5 * x_te @ w / 3 + 1.5))
    train = _adata(x_tr, c_tr)
    test = _adata(x_te, c_te, slides=["A"] * 5 + ["B"] * 5)
    return train, test


def _by_hand(train, test, genes, n_comp):
    """StandardScaler + PCA (SVD) + closed-form ridge without intercept + per-slide Pearson, in NumPy."""
    x_tr = train.obsm["X_emb"].astype(np.float64)
    x_te = test.obsm["X_emb"].astype(np.float64)
    gi_tr = train.var_names.get_indexer(genes)
    gi_te = test.var_names.get_indexer(genes)
    y_tr = np.log1p(train.X.toarray()[:, gi_tr].astype(np.float64))
    y_te = np.log1p(test.X.toarray()[:, gi_te].astype(np.float64))
    if n_comp is not None:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        z_tr, z_te = (x_tr - mu) / sd, (x_te - mu) / sd
        _, _, vt = np.linalg.svd(z_tr - z_tr.mean(0), full_matrices=False)
        x_tr = (z_tr - z_tr.mean(0)) @ vt[:n_comp].T
        x_te = (z_te - z_tr.mean(0)) @ vt[:n_comp].T
    alpha = 100 / (x_tr.shape[1] * len(genes))
    w = np.linalg.solve(x_tr.T @ x_tr + alpha * np.eye(x_tr.shape[1]), x_tr.T @ y_tr)
    pred = x_te @ w
    out = {}
    for s in ("A", "B"):
        m = (test.obs["slide"] == s).to_numpy()
        out[s] = np.array([np.corrcoef(y_te[m, j], pred[m, j])[0, 1] for j in range(len(genes))])
    return out


@pytest.mark.parametrize("n_comp", [3, None])
def test_probe_matches_hand_computation(tiny, n_comp):
    train, test = tiny
    genes = ["G0", "G1", "G2", "G3"]
    kw = {"dimreduce": "pca", "latent_dim": n_comp} if n_comp else {"dimreduce": None}
    res, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=genes, slide_key="slide", **kw)
    expected = _by_hand(train, test, genes, n_comp)
    assert list(res.columns) == ["slide", "gene", "pearson"]
    assert len(res) == 8
    for s in ("A", "B"):
        got = res.loc[res["slide"] == s].set_index("gene").loc[genes, "pearson"].to_numpy()
        np.testing.assert_allclose(got, expected[s], atol=5e-4)  # lsqr stops at tol=1e-4
        assert summary.loc[s, "mean_pearson"] == pytest.approx(expected[s].mean(), abs=5e-4)
        assert summary.loc[s, "n_spots"] == 5
    p = summary.attrs["params"]
    assert p["alpha"] == pytest.approx(100 / ((n_comp or 5) * 4))
    assert p["n_components"] == n_comp


def test_probe_one_feature_scalar_ridge():
    """One feature, no PCA: w = Σxy / (Σx² + α), α = 100 / (1 · 1) — fully by hand."""
    x_tr = np.array([[1.0], [2.0], [3.0]])
    c_tr = np.array([[0], [np.e - 1], [np.e**2 - 1]])  # rounded below: counts 0, 2, 6
    train = _adata(x_tr, np.round(c_tr))
    x_te = np.array([[1.0], [4.0], [2.0]])
    test = _adata(x_te, np.array([[0.0], [5.0], [1.0]]))
    y = np.log1p(np.round(c_tr)).ravel()
    w = (x_tr.ravel() * y).sum() / ((x_tr.ravel() ** 2).sum() + 100.0)
    res, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=["G0"], dimreduce=None)
    # predictions are w·x (w > 0), so Pearson is that of x_te with log1p(y_te)
    assert w > 0
    expected = np.corrcoef(x_te.ravel(), np.log1p([0.0, 5.0, 1.0]))[0, 1]
    assert res["pearson"].iloc[0] == pytest.approx(expected, abs=1e-6)
    assert summary.attrs["params"]["alpha"] == pytest.approx(100.0)


def test_alpha_number_and_target_sum(tiny):
    train, test = tiny
    genes = ["G0", "G1"]
    _, s1 = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=genes, alpha=0.5, dimreduce=None)
    assert s1.attrs["params"]["alpha"] == 0.5
    _, s2 = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=genes, target_sum=1e4, dimreduce=None)
    _, s3 = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=genes, dimreduce=None)
    assert s2["mean_pearson"].iloc[0] != pytest.approx(s3["mean_pearson"].iloc[0])


def test_pca_capped_by_spots(tiny):
    train, test = tiny
    _, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=["G0"], latent_dim=256)
    assert summary.attrs["params"]["n_components"] == 5  # min(256, 12 spots, 5 features)


def test_pearson_columns_matches_corrcoef_and_nan_for_constant():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 4))
    b = a + rng.normal(size=(30, 4))
    a[:, 3] = 2.0
    r = pearson_columns(a, b)
    for j in range(3):
        assert r[j] == pytest.approx(np.corrcoef(a[:, j], b[:, j])[0, 1])
    assert np.isnan(r[3])


def test_constant_test_gene_is_nan_and_counted(tiny):
    train, test = tiny
    test = test.copy()
    x = test.X.toarray()
    x[:, 1] = 3
    test.X = sp.csr_matrix(x)
    res, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", genes=["G0", "G1"], slide_key="slide")
    assert res.loc[res["gene"] == "G1", "pearson"].isna().all()
    assert (summary["n_nan"] == 1).all()
    assert np.isfinite(summary["mean_pearson"]).all()


def test_gene_panel_from_training_only():
    """A gene variable only in the test data must not be chosen."""
    rng = np.random.default_rng(2)
    n, g = 80, 100
    means = np.exp(rng.uniform(0, 3, g))
    c_tr = rng.poisson(means, size=(n, g)).astype(float)
    c_te = rng.poisson(means, size=(n, g)).astype(float)
    c_tr[:, 0] = rng.poisson(means[0] * rng.choice([0.05, 2.0], n))  # over-dispersed in train only
    c_te[:, 1] = rng.poisson(means[1] * rng.choice([0.05, 2.0], n))  # over-dispersed in test only
    train = _adata(rng.normal(size=(n, 3)), c_tr)
    test = _adata(rng.normal(size=(n, 3)), c_te)
    _, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", n_genes=1)
    assert summary.attrs["params"]["genes"] == ["G0"]
    _, summary = ss.tl.expression_probe(train, test, use_rep="X_emb", n_genes=3)
    assert "G0" in summary.attrs["params"]["genes"] and "G1" not in summary.attrs["params"]["genes"]
    # variance flavour: by hand
    y = np.log1p(c_tr)
    assert hest_gene_panel([train], 2, flavor="variance") == [f"G{i}" for i in np.argsort(-y.var(0))[:2]]


def test_probe_on_toy_data_signal_vs_shuffled(toy):
    train = toy[toy.obs["slide"] != "slide3"].copy()
    test = toy[toy.obs["slide"] == "slide3"].copy()
    _, good = ss.tl.expression_probe(train, test, use_rep="X_image", n_genes=20, layer="counts")
    rng = np.random.default_rng(0)
    test.obsm["X_shuffled"] = test.obsm["X_image"][rng.permutation(test.n_obs)]
    train.obsm["X_shuffled"] = train.obsm["X_image"]
    _, bad = ss.tl.expression_probe(train, test, use_rep="X_shuffled", n_genes=20, layer="counts")
    assert good["mean_pearson"].iloc[0] > 0.2
    assert abs(bad["mean_pearson"].iloc[0]) < 0.15


def test_probe_does_not_modify_inputs_and_validates(tiny):
    train, test = tiny
    before = (train.copy(), test.copy())
    ss.tl.expression_probe(train, test, use_rep="X_emb", genes=["G0"])
    for a, b in zip(before, (train, test), strict=True):
        assert list(a.obsm) == list(b.obsm) and list(a.obs.columns) == list(b.obs.columns)
        assert list(a.uns) == list(b.uns)
        np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    with pytest.raises(KeyError, match="X_missing"):
        ss.tl.expression_probe(train, test, use_rep="X_missing")
    with pytest.raises(KeyError, match="not in `test.var_names`"):
        ss.tl.expression_probe(train, test[:, :2].copy(), use_rep="X_emb", genes=["G3"])
    with pytest.raises(ValueError, match="dimreduce"):
        ss.tl.expression_probe(train, test, use_rep="X_emb", dimreduce="umap")
    with pytest.raises(ValueError, match="fewer than `n_genes"):
        ss.tl.expression_probe(train, test, use_rep="X_emb", n_genes=10)
    other = test.copy()
    other.obsm["X_emb"] = np.zeros((other.n_obs, 2), np.float32)
    with pytest.raises(ValueError, match="same encoder"):
        ss.tl.expression_probe(train, other, use_rep="X_emb")
    with pytest.raises(KeyError, match="slide_key"):
        ss.tl.expression_probe(train, test, use_rep="X_emb", genes=["G0"], slide_key="nope")
