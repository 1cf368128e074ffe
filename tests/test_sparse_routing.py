"""Sparse routing: only experts with weight ≥ eps are evaluated; the error bound and the exact default."""

import numpy as np
import pytest
import torch

import spade_sc as ss
from spade_sc.model._routing import auto_routing_eps, head_output_bound, sparsify_weights


@pytest.fixture(scope="module")
def fitted():
    adata = ss.datasets.toy(random_state=1, n_slides=3, grid=10)
    model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=2, proj_dim=16,
                            device="cpu")
    return adata, model


def test_head_output_bound_holds_for_any_input():
    from spade_sc.model._heads import StackedHeads

    heads = StackedHeads(3, 5, 12, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        heads.ln_weight.uniform_(-2, 2)
        heads.ln_bias.uniform_(-1, 1)
    r = head_output_bound(heads)
    x = torch.randn(3, 2000, 5) * torch.logspace(-2, 3, 2000).view(1, -1, 1)
    out = heads(x)
    assert out.abs().max() <= r
    # the bound is attained up to LayerNorm's eps: a one-hot-like pre-norm vector reaches sqrt(P - 1)
    z = torch.zeros(12)
    z[0] = 1e3
    ln = torch.nn.functional.layer_norm(z, (12,))
    assert ln.abs().max() == pytest.approx(np.sqrt(11), rel=1e-4)


def test_auto_eps_embedding_within_1e4_of_dense(fitted):
    adata, model = fitted
    dense, w_dense = model.get_embedding(adata, routing_eps=0.0)
    sparse, w_sparse = model.get_embedding(adata)  # default: "auto"
    eps = model.resolve_routing_eps("auto")
    assert eps == pytest.approx(1e-4 / (2 * (model.n_experts_ - 1) * head_output_bound(model.pairs_.image)))
    assert np.abs(sparse - dense).max() <= 1e-4
    np.testing.assert_allclose(w_sparse.sum(1), 1, rtol=1e-6)
    # the weights that were dropped are exactly those below eps (the top expert always kept)
    dropped = (w_sparse == 0) & (w_dense > 0)
    assert (w_dense[dropped] < eps).all()


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3])
def test_error_bound_for_any_eps(fitted, eps):
    adata, model = fitted
    dense, w = model.get_embedding(adata, routing_eps=0.0, tau=1.0)
    sparse, ws = model.get_embedding(adata, routing_eps=eps, tau=1.0)
    r = head_output_bound(model.pairs_.image)
    dropped_mass = np.where(ws == 0, w, 0).sum(1)
    err = np.abs(sparse - dense).max(1)
    assert (err <= 2 * dropped_mass * r + 1e-5).all()
    assert (dropped_mass < (model.n_experts_ - 1) * eps + 1e-7).all()
    if eps >= 0.1:
        assert (ws == 0).any()  # something was actually dropped at this temperature


def test_expression_modality_uses_expression_heads_bound(fitted):
    adata, model = fitted
    assert model.resolve_routing_eps("auto", "expression") == pytest.approx(
        auto_routing_eps(model.n_experts_, head_output_bound(model.pairs_.expression)))
    dense, _ = model.get_embedding(adata, modality="expression", layer="counts", routing_eps=0.0)
    sparse, _ = model.get_embedding(adata, modality="expression", layer="counts")
    assert np.abs(sparse - dense).max() <= 1e-4


def test_sparsify_keeps_top_and_renormalises():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.05, 0.05, 0.9], [0.34, 0.33, 0.33]])
    s = sparsify_weights(w, 0.34)
    torch.testing.assert_close(s.sum(1), torch.ones(3))
    assert s[0].tolist() == [1.0, 0.0, 0.0]
    assert s[1].tolist() == [0.0, 0.0, 1.0]
    assert s[2, 0] == 1.0


def test_embed_default_is_auto_and_records_threshold(fitted):
    adata, model = fitted
    a = adata.copy()
    ss.tl.embed(a, model)
    assert a.uns["spade"]["embed_params"]["routing_eps"] == pytest.approx(model.resolve_routing_eps())
    with pytest.raises(ValueError, match="'auto'"):
        ss.tl.embed(a, model, routing_eps="fast")
