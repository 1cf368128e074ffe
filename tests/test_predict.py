"""``tl.predict_expression``: retrieval and ridge against independent computations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import spade_sc as ss
from spade_sc.tl._predict import normalized_expression


@pytest.fixture(scope="module")
def fitted(small_toy_master):
    data = small_toy_master.copy()
    ss.pp.select_genes(data, batch_key="slide", n_top_genes=10)
    ref = data[data.obs["slide"] != "slide2"].copy()
    query = data[data.obs["slide"] == "slide2"].copy()
    model = ss.tl.fit_spade(
        ref, batch_key="slide", n_prototypes=4, n_experts=2, proj_dim=32, max_epochs=2, val_fraction=0.0
    )
    return model, ref, query


def _tiny(feats, counts):
    a = AnnData(
        X=sp.csr_matrix(np.asarray(counts, np.float32)),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(feats))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(np.shape(counts)[1])]),
    )
    a.obsm["X_image"] = np.asarray(feats, np.float32)
    return a


def test_retrieval_weights_by_hand():
    """3 reference spots, 1 query; cosine similarities, top-2, softmax(sim / T) — computed by hand."""
    ref = _tiny([[1, 0], [0, 1], [1, 1]], [[10, 0, 5], [0, 10, 5], [3, 3, 9]])
    query = _tiny([[2, 1]], [[1, 1, 1]])
    ss.tl.predict_expression(query, None, reference=ref, k=2, temperature=0.5)
    y = np.log1p(np.array([[10, 0, 5], [0, 10, 5], [3, 3, 9]], float) * 1e4 / np.array([[15], [15], [15]]))
    q = np.array([2, 1]) / np.sqrt(5)
    sims = np.array([q @ [1, 0], q @ [0, 1], q @ (np.array([1, 1]) / np.sqrt(2))])
    top = np.argsort(-sims)[:2]  # spots 0 and 2
    w = np.exp(sims[top] / 0.5)
    w /= w.sum()
    np.testing.assert_allclose(query.obsm["spade_predicted"][0], w @ y[top], rtol=1e-5)
    assert list(query.uns["spade_predicted"]["genes"]) == ["G0", "G1", "G2"]
    ss.tl.predict_expression(query, None, reference=ref, k=2, weighting="uniform", similarity="dot")
    dots = np.array([2, 1, 3])
    np.testing.assert_allclose(query.obsm["spade_predicted"][0], y[np.argsort(-dots)[:2]].mean(0), rtol=1e-5)


def test_self_retrieval_k1_returns_own_expression(toy):
    ss.tl.predict_expression(toy, None, reference=toy, k=1, genes=["TUM1", "STR1", "BG3"], layer="counts")
    expected = normalized_expression(toy, ["TUM1", "STR1", "BG3"], layer="counts")
    np.testing.assert_allclose(toy.obsm["spade_predicted"], expected, rtol=1e-5, atol=1e-6)


def test_ridge_recovers_linear_map():
    rng = np.random.default_rng(0)
    counts = rng.poisson(20, size=(80, 4)) + 1
    y = np.log1p(counts * 1e4 / counts.sum(1, keepdims=True))
    ref = _tiny(y @ rng.normal(size=(4, 6)), counts)  # features: a linear image of the targets
    ss.tl.predict_expression(ref, None, reference=ref.copy(), method="ridge", alpha=1e-6)
    np.testing.assert_allclose(ref.obsm["spade_predicted"], y, atol=1e-3)


def test_with_model_convex_combination_permutation_and_roundtrip(fitted, tmp_path):
    model, ref, query = fitted
    ref_before = ref.copy()
    q = query.copy()
    ss.tl.predict_expression(q, model, reference=ref, k=10)
    pred = q.obsm["spade_predicted"]
    assert pred.shape == (q.n_obs, len(model.genes_)) and pred.dtype == np.float32
    assert list(q.uns["spade_predicted"]["genes"]) == list(model.genes_)
    # retrieval averages reference spots: every prediction lies within the reference's range per gene
    y_ref = normalized_expression(ref, model.genes_)
    assert np.all(pred >= y_ref.min(0) - 1e-5) and np.all(pred <= y_ref.max(0) + 1e-5)
    # the reference is untouched
    assert list(ref.obsm) == list(ref_before.obsm) and list(ref.uns) == list(ref_before.uns)
    assert list(ref.obs.columns) == list(ref_before.obs.columns)
    # permuting the query spots permutes the predictions
    perm = np.random.default_rng(0).permutation(q.n_obs)
    qp = query[perm].copy()
    ss.tl.predict_expression(qp, model, reference=ref, k=10)
    np.testing.assert_allclose(qp.obsm["spade_predicted"], pred[perm], rtol=1e-5, atol=1e-6)
    # write → read keeps the keys
    path = tmp_path / "q.h5ad"
    q.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["spade_predicted"], pred)
    assert list(back.uns["spade_predicted"]["genes"]) == list(model.genes_)
    assert back.uns["spade_predicted"]["params"]["method"] == "retrieval"


def test_retrieval_matches_manual_joint_space(fitted):
    """Query by image, reference by expression, cosine top-k uniform mean — recomputed from get_embedding."""
    model, ref, query = fitted
    q = query.copy()
    ss.tl.predict_expression(q, model, reference=ref, k=5, weighting="uniform", key_added="ret")
    e_q, _ = model.get_embedding(query, modality="image")
    e_r, _ = model.get_embedding(ref, modality="expression")
    e_q /= np.linalg.norm(e_q, axis=1, keepdims=True)
    e_r /= np.linalg.norm(e_r, axis=1, keepdims=True)
    top = np.argsort(-(e_q @ e_r.T), axis=1)[:, :5]
    y_ref = normalized_expression(ref, model.genes_)
    np.testing.assert_allclose(q.obsm["ret_predicted"], y_ref[top].mean(1), rtol=1e-4, atol=1e-5)


def test_ridge_with_model_and_copy(fitted):
    model, ref, query = fitted
    q = query.copy()
    out = ss.tl.predict_expression(q, model, reference=ref, method="ridge", alpha=10.0, copy=True)
    assert "spade_predicted" not in q.obsm
    assert out.obsm["spade_predicted"].shape == (q.n_obs, len(model.genes_))
    assert out.uns["spade_predicted"]["params"]["method"] == "ridge"
    # independent: standardise the reference's image embeddings, closed-form ridge with intercept
    e_r, _ = model.get_embedding(ref, modality="image")
    e_q, _ = model.get_embedding(query, modality="image")
    mu, sd = e_r.mean(0), e_r.std(0)
    z_r, z_q = (e_r - mu) / sd, (e_q - mu) / sd
    y = normalized_expression(ref, model.genes_).astype(np.float64)
    zc = z_r - z_r.mean(0)
    w = np.linalg.solve(zc.T @ zc + 10.0 * np.eye(zc.shape[1]), zc.T @ (y - y.mean(0)))
    expected = (z_q - z_r.mean(0)) @ w + y.mean(0)
    np.testing.assert_allclose(out.obsm["spade_predicted"], expected, rtol=1e-3, atol=1e-3)


def test_errors_leave_query_untouched(fitted):
    model, ref, query = fitted
    q = query.copy()
    with pytest.raises(ValueError, match="method"):
        ss.tl.predict_expression(q, model, reference=ref, method="knn")
    with pytest.raises(KeyError, match="not in the reference"):
        ss.tl.predict_expression(q, model, reference=ref, genes=["NOT_A_GENE"])
    no_panel = ref[:, ~ref.var_names.isin(model.genes_[:1])].copy()
    with pytest.raises(ValueError, match="not in .reference.var_names"):
        ss.tl.predict_expression(q, model, reference=no_panel, genes=list(no_panel.var_names[:3]))
    other = ref.copy()
    other.obsm["X_image"] = np.zeros((other.n_obs, 3), np.float32)
    with pytest.raises(ValueError, match="same encoder"):
        ss.tl.predict_expression(q, model, reference=other)
    with pytest.raises(ValueError, match="not fitted"):
        ss.tl.predict_expression(q, ss.SpadeModel(), reference=ref)
    with pytest.raises(TypeError, match="SpadeModel"):
        ss.tl.predict_expression(q, "model", reference=ref)
    with pytest.raises(ValueError, match="k"):
        ss.tl.predict_expression(q, model, reference=ref, k=0)
    assert "spade_predicted" not in q.obsm and "spade_predicted" not in q.uns
