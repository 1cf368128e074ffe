"""On the toy data, SPADE learns something real: experts follow the hidden tissue domains and the embedding
predicts the expression of a held-out slide better than the raw image features do."""

import numpy as np
import pytest
import scanpy as sc
from sklearn.linear_model import RidgeCV
from sklearn.metrics import adjusted_rand_score

import spade_sc as ss


def _ridge_pearson(x_train, y_train, x_test, y_test):
    """Mean per-gene Pearson of a ridge map (alpha chosen by leave-one-out CV on the training spots only)."""
    pred = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_train, y_train).predict(x_test)
    keep = y_test.std(0) > 0
    r = [np.corrcoef(pred[:, j], y_test[:, j])[0, 1] for j in np.flatnonzero(keep)]
    return float(np.mean(r))


@pytest.fixture(scope="module")
def held_out(toy_master):
    adata = toy_master.copy()
    ss.pp.select_genes(adata, batch_key="slide", n_top_genes=50)
    test = (adata.obs["slide"] == "slide3").to_numpy()
    train = adata[~test].copy()
    model = ss.tl.fit_spade(train, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=30, lr=1e-3)
    ss.tl.embed(adata, model, tau=1.0)
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    y = norm[:, norm.var["spade_gene"]].X.toarray()
    return adata, train, model, test, y


def test_embedding_predicts_held_out_expression_better_than_raw_features(held_out):
    adata, _, _, test, y = held_out
    raw = _ridge_pearson(adata.obsm["X_image"][~test], y[~test], adata.obsm["X_image"][test], y[test])
    spade = _ridge_pearson(adata.obsm["X_spade"][~test], y[~test], adata.obsm["X_spade"][test], y[test])
    print(f"held-out slide, ridge mean Pearson: raw features {raw:.3f}, SPADE {spade:.3f}")
    assert spade > raw + 0.02


def test_experts_follow_tissue_domains(held_out):
    adata, train, _, _, _ = held_out
    ari = adjusted_rand_score(train.obs["domain"], train.obs["spade_expert"])
    rng = np.random.default_rng(0)
    chance = max(
        adjusted_rand_score(train.obs["domain"], rng.permutation(train.obs["spade_expert"].to_numpy()))
        for _ in range(20)
    )
    print(f"ARI(spade_expert, domain) = {ari:.3f} (best of 20 shuffles: {chance:.3f})")
    assert ari > 0.3 > chance
