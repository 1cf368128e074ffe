"""The training hot path: sparse expression minibatches, CSR kernels, fused AdamW, prefetch."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from spade_sc.model._data import ExpressionSource
from spade_sc.model._heads import ExpertPairs
from spade_sc.model._trainer import TrainConfig, train_experts


def _problem(seed=0, n=120, d=6, g=40, density=0.2):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    counts = sp.random(n, g, density=density, format="csr", random_state=seed, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5).astype(np.float32)
    counts = sp.csr_matrix(counts + sp.eye(n, g, format="csr", dtype=np.float32))  # no empty row
    spots = [np.arange(0, 60), np.arange(60, 90), np.arange(90, 120)]
    return feats, counts, spots


def _fit(feats, counts, spots, *, sparse, prefetch=True, dropout=0.1, epochs=2, gene_idx=None):
    g = counts.shape[1] if gene_idx is None else len(gene_idx)
    gen = torch.Generator().manual_seed(1)
    pairs = ExpertPairs(len(spots), feats.shape[1], g, 8, dropout=dropout, generator=gen)
    expr = ExpressionSource(counts, np.arange(counts.shape[1]) if gene_idx is None else gene_idx)
    cfg = TrainConfig(max_epochs=epochs, batch_size=16, lr=1e-2, random_state=0, sparse_input=sparse,
                      prefetch=prefetch)
    empty = [np.zeros(0, dtype=np.int64)] * len(spots)
    hist = train_experts(pairs, feats, expr, spots, empty, cfg, torch.device("cpu"))
    return pairs, hist


def test_sparse_minibatches_equal_dense():
    feats, counts, spots = _problem()
    dense, h1 = _fit(feats, counts, spots, sparse=False)
    sparse, h2 = _fit(feats, counts, spots, sparse=True, prefetch=False)
    for (k, a), b in zip(dense.state_dict().items(), sparse.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    np.testing.assert_allclose(h1["train_loss"], h2["train_loss"], rtol=1e-5)


def test_gene_panel_subset_sparse_equals_dense():
    feats, counts, spots = _problem(seed=2, g=50)
    panel = np.array([3, 7, 8, 20, 21, 30, 44, 49])
    dense, _ = _fit(feats, counts, spots, sparse=False, gene_idx=panel, epochs=1)
    sparse, _ = _fit(feats, counts, spots, sparse=True, gene_idx=panel, epochs=1)
    for a, b in zip(dense.state_dict().values(), sparse.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_gather_rows_matches_scipy():
    from spade_sc.model._kernels import densify, gather_rows

    rng = np.random.default_rng(0)
    x = sp.random(30, 25, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 9)
    x16 = sp.csr_matrix((x.data.astype(np.uint16), x.indices, x.indptr), shape=x.shape)  # compact counts
    rows = np.array([4, -1, 0, 29, 4, 11])
    panel = np.array([0, 5, 6, 24])
    col_map = np.full(25, -1, dtype=np.int32)
    col_map[panel] = np.arange(len(panel))
    scale = rng.uniform(0.5, 2, 30).astype(np.float32)
    ip, ii, vv = gather_rows(x16.indptr, x16.indices, x16.data, rows, col_map, scale)
    got = densify(ip, ii, vv, len(panel))
    want = np.log1p(x[np.maximum(rows, 0)][:, panel].toarray() * scale[np.maximum(rows, 0), None])
    want[rows < 0] = 0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_stacked_spmm_and_gradient():
    from spade_sc.model._step import SparseRows, _SparseFirstLayer

    x = sp.random(3 * 4, 9, density=0.4, format="csr", random_state=1, dtype=np.float32)
    rows = SparseRows(x.indptr.astype(np.int64), x.indices.astype(np.int32), x.data, 9, 4)
    w = torch.randn(3, 9, 5, dtype=torch.float32, requires_grad=True)
    out = _SparseFirstLayer.apply(w, rows)
    dense = torch.from_numpy(x.toarray()).view(3, 4, 9)
    w2 = w.detach().clone().requires_grad_(True)
    want = torch.bmm(dense, w2)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_does_not_change_results(prefetch):
    feats, counts, spots = _problem(seed=3)
    a, _ = _fit(feats, counts, spots, sparse=False, prefetch=prefetch, epochs=1)
    b, _ = _fit(feats, counts, spots, sparse=False, prefetch=not prefetch, epochs=1)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("n_exp", [1, 3])
def test_column_kernels_match_dense(monkeypatch, threads, n_exp):
    """Column-major SpMM (split into row blocks when experts < threads) and the fused sparse AdamW update
    (blocks of 256 columns; 600 genes span three) equal dense torch, for a non-contiguous set of experts."""
    from spade_sc.model import _kernels

    monkeypatch.setattr(_kernels, "_n_threads", lambda: threads)
    b, g, p = 5, 600, 4
    x = sp.random(n_exp * b, g, density=0.05, format="csr", random_state=2, dtype=np.float32)
    x.indices = x.indices.astype(np.int32)
    rng = np.random.default_rng(0)
    w_all = rng.standard_normal((4, g, p)).astype(np.float32)
    dense = x.toarray().reshape(n_exp, b, g)
    experts = np.array([3, 0, 2][:n_exp])  # stacked slot of each expert block, not in order
    out = _kernels.stacked_spmm(x.indptr, x.indices, x.data, np.ascontiguousarray(w_all[experts]), b)
    np.testing.assert_allclose(out.reshape(n_exp, b, p), dense @ w_all[experts], rtol=1e-5, atol=1e-5)

    dout = rng.standard_normal((n_exp * b, p)).astype(np.float32)
    w, m, v = w_all.copy(), rng.random(w_all.shape).astype(np.float32), rng.random(w_all.shape).astype(np.float32)
    lr, bc1, bc2 = np.full(n_exp, 0.01), np.full(n_exp, 0.2), np.full(n_exp, 0.05)
    want_w, want_m, want_v = torch.from_numpy(w.copy()), torch.from_numpy(m.copy()), torch.from_numpy(v.copy())
    grad = torch.from_numpy(np.einsum("ebg,ebp->egp", dense, dout.reshape(n_exp, b, p)))
    for j, e in enumerate(experts):  # AdamW as torch writes it, with the given bias corrections
        want_w[e].mul_(1 - lr[j] * 0.01)
        want_m[e].lerp_(grad[j], 0.1)
        want_v[e].mul_(0.999).addcmul_(grad[j], grad[j], value=0.001)
        want_w[e].addcdiv_(want_m[e], want_v[e].sqrt() / bc2[j] + 1e-8, value=-lr[j] / bc1[j])
    _kernels.sparse_wgrad_adamw(x.indptr, x.indices, x.data, dout, b, experts, w, m, v, lr, bc1, bc2,
                                beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8)
    np.testing.assert_allclose(m, want_m.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, want_v.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-5, atol=1e-6)
    untouched = [e for e in range(4) if e not in experts]
    np.testing.assert_array_equal(w[untouched], w_all[untouched])
