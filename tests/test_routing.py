import numpy as np
import pytest
import torch

from spade_sc.model._routing import numpy_routing, routing_weights, sparsify_weights


def _setup(seed=0, n=40, k=9, d=5, e=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    c = rng.standard_normal((k, d)).astype(np.float32)
    c2e = rng.integers(0, e, k)
    c2e[:e] = np.arange(e)  # every expert owns a centroid
    return x, c, c2e, e


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0, 10.0])
def test_routing_matches_numpy_and_sums_to_one(tau):
    x, c, c2e, e = _setup()
    w = routing_weights(torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(c2e), e, tau, 1.7).numpy()
    np.testing.assert_allclose(w, numpy_routing(x, c, c2e, e, tau, 1.7), atol=1e-5)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert (w >= 0).all()


def test_hard_routing_limit_is_nearest_prototype_expert():
    x, c, c2e, e = _setup(1)
    w = routing_weights(torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(c2e), e, 1e-6).numpy()
    nearest = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(w.argmax(1), c2e[nearest])
    np.testing.assert_allclose(w.max(1), 1.0, atol=1e-6)


def test_sparsify_keeps_top_and_renormalises():
    w = torch.tensor([[0.7, 0.2999, 1e-4], [0.5, 0.5, 0.0], [1e-3, 1e-3, 0.998]])
    s = sparsify_weights(w, 1e-2)
    np.testing.assert_allclose(s.sum(1).numpy(), 1.0, atol=1e-6)
    assert s[0, 2] == 0 and s[2, 0] == 0 and s[2, 2] == 1.0
    assert s[1, 0] == 0.5
