"""Compiled (numba) kernels over CSR arrays for the training hot path.

Compiled lazily on first use and cached on disk (``cache=True``); every kernel releases the GIL, so the next
minibatch can be built in a background thread while the current step runs.

- :func:`gather_rows`: rows of a CSR matrix (any value/index dtype, e.g. ``uint16`` counts with ``int32``
  indices) restricted to a gene panel, optionally ``log1p(x · scale[row])``, as a new float32 CSR; row ``-1``
  gives an empty row (padding). No scipy fancy indexing, no copy of the whole matrix.
- :func:`densify`: CSR → dense ``[n, n_cols]`` float32.
- :func:`stacked_spmm` / :func:`stacked_spmm_wgrad`: ``out[e·B + i] = X[e·B + i] @ W[e]`` and its weight
  gradient ``dW[e] = X_eᵀ @ dOut_e`` for a CSR ``X`` of ``E·B`` rows (``B`` rows per expert).
- :func:`expert_columns`: a column-major copy of each expert's rows. :func:`stacked_spmm` and
  :func:`sparse_wgrad_adamw` work column by column, so each row of ``W[e]`` (1 KB at ``P = 256``) is read
  once per step instead of once per non-zero; they sum in the same order as a row-wise pass.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["gather_rows", "densify", "expert_columns", "stacked_spmm", "stacked_spmm_wgrad", "sparse_wgrad_adamw",
           "row_sums"]


@functools.cache
def _jit():
    import numba as nb

    opts = dict(nogil=True, cache=True)
    popts = dict(nogil=True, cache=True, parallel=True)

    @nb.njit(**opts)
    def _count(indptr, indices, rows, col_map):
        n = rows.shape[0]
        counts = np.zeros(n + 1, dtype=np.int64)
        for i in range(n):
            r = rows[i]
            if r < 0:
                continue
            c = 0
            for k in range(indptr[r], indptr[r + 1]):
                if col_map[indices[k]] >= 0:
                    c += 1
            counts[i + 1] = c
        return np.cumsum(counts)

    @nb.njit(**opts)
    def _fill(indptr, indices, data, rows, col_map, scale, out_ptr, out_idx, out_val):
        for i in range(rows.shape[0]):
            r = rows[i]
            if r < 0:
                continue
            o = out_ptr[i]
            f = np.float32(scale[r])
            for k in range(indptr[r], indptr[r + 1]):
                j = col_map[indices[k]]
                if j >= 0:
                    out_idx[o] = j
                    out_val[o] = np.float32(data[k]) * f
                    o += 1

    @nb.njit(**opts)
    def _densify(indptr, indices, data, out):
        for i in range(out.shape[0]):
            for k in range(indptr[i], indptr[i + 1]):
                out[i, indices[k]] = data[k]

    @nb.njit(**popts)
    def _columns(indptr, indices, data, rows_per_expert, n_exp, n_cols, cptr, crow, cval):
        # column-major copy of each expert's block of rows: column c of block j is
        # crow/cval[cptr[j, c]:cptr[j, c + 1]], rows in increasing order (the CSR's summation order)
        for j in nb.prange(n_exp):
            r0 = j * rows_per_expert
            r1 = r0 + rows_per_expert
            cp = cptr[j]
            for c in range(n_cols + 1):
                cp[c] = 0
            for i in range(r0, r1):
                for k in range(indptr[i], indptr[i + 1]):
                    cp[indices[k] + 1] += 1
            cp[0] = indptr[r0] - indptr[0]
            for c in range(n_cols):
                cp[c + 1] += cp[c]
            pos = cp[:-1].copy()
            for i in range(r0, r1):
                for k in range(indptr[i], indptr[i + 1]):
                    c = indices[k]
                    crow[pos[c]] = i
                    cval[pos[c]] = data[k]
                    pos[c] += 1

    @nb.njit(**popts)
    def _spmm(cptr, crow, cval, w, rows_per_expert, out, row_block):
        # one task per (expert, block of rows): each row of W[e] is read once per task, not once per non-zero
        n_exp = cptr.shape[0]
        n_cols, p = w.shape[1], w.shape[2]
        n_rb = (rows_per_expert + row_block - 1) // row_block
        for t in nb.prange(n_exp * n_rb):
            e = t // n_rb
            lo = e * rows_per_expert + (t % n_rb) * row_block
            hi = min(lo + row_block, (e + 1) * rows_per_expert)
            for i in range(lo, hi):
                for j in range(p):
                    out[i, j] = 0.0
            for c in range(n_cols):
                for k in range(cptr[e, c], cptr[e, c + 1]):
                    i = crow[k]
                    if i >= lo and i < hi:
                        v = cval[k]
                        for j in range(p):
                            out[i, j] += v * w[e, c, j]

    @nb.njit(**popts)
    def _wgrad(indptr, indices, data, dout, rows_per_expert, dw):
        p = dw.shape[2]
        for e in nb.prange(dw.shape[0]):
            dw[e] = 0.0
            for i in range(e * rows_per_expert, (e + 1) * rows_per_expert):
                for k in range(indptr[i], indptr[i + 1]):
                    v = data[k]
                    g = indices[k]
                    for j in range(p):
                        dw[e, g, j] += v * dout[i, j]

    @nb.njit(**popts)
    def _wgrad_adamw(cptr, crow, cval, dout, experts, w, m, v, lr, bc1, bc2s, beta1, beta2, wd, eps, col_block):
        # one task per (active expert j, block of columns): the gradient row of column c (stacked slot
        # e = experts[j]) is built in a P-vector and applied at once to w[e, c], m[e, c], v[e, c]
        n_cols, p = w.shape[1], w.shape[2]
        n_cb = (n_cols + col_block - 1) // col_block
        one_b1 = np.float32(1.0 - beta1)
        one_b2 = np.float32(1.0 - beta2)
        fb2 = np.float32(beta2)
        feps = np.float32(eps)
        for t in nb.prange(experts.shape[0] * n_cb):
            j = t // n_cb
            c0 = (t % n_cb) * col_block
            c1 = min(c0 + col_block, n_cols)
            e = experts[j]
            g = np.empty(p, dtype=np.float32)
            decay = np.float32(1.0 - lr[j] * wd)
            step = np.float32(lr[j] / bc1[j])
            b2s = np.float32(bc2s[j])
            for c in range(c0, c1):
                for q in range(p):
                    g[q] = 0.0
                for k in range(cptr[j, c], cptr[j, c + 1]):
                    i = crow[k]
                    val = cval[k]
                    for q in range(p):
                        g[q] += val * dout[i, q]
                for q in range(p):
                    gr = g[q]
                    mm = m[e, c, q]
                    mm = mm + one_b1 * (gr - mm)
                    vv = fb2 * v[e, c, q] + one_b2 * gr * gr
                    m[e, c, q] = mm
                    v[e, c, q] = vv
                    w[e, c, q] = w[e, c, q] * decay - step * mm / (np.sqrt(vv) / b2s + feps)

    @nb.njit(**opts)
    def _row_sums(indptr, data, out):
        for i in range(out.shape[0]):
            s = 0.0
            for k in range(indptr[i], indptr[i + 1]):
                s += data[k]
            out[i] = s

    return {"count": _count, "fill": _fill, "densify": _densify, "columns": _columns, "spmm": _spmm,
            "wgrad": _wgrad, "wgrad_adamw": _wgrad_adamw, "row_sums": _row_sums}


def gather_rows(indptr, indices, data, rows: np.ndarray, col_map: np.ndarray, scale: np.ndarray | None):
    """Rows ``rows`` (``-1``: empty) of a CSR matrix, columns mapped by ``col_map`` (``-1``: dropped).

    Returns float32 ``(indptr int64, indices int32, data float32)``; values are ``log1p(x · scale[row])``
    when ``scale`` is given, else ``x``.
    """
    k = _jit()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out_ptr = k["count"](indptr, indices, rows, col_map)
    nnz = int(out_ptr[-1])
    out_idx = np.empty(nnz, dtype=np.int32)
    out_val = np.empty(nnz, dtype=np.float32)
    sc = scale if scale is not None else np.ones(int(rows.max(initial=0)) + 1, dtype=np.float32)
    k["fill"](indptr, indices, data, rows, col_map, sc, out_ptr, out_idx, out_val)
    if scale is not None:
        np.log1p(out_val, out=out_val)
    return out_ptr, out_idx, out_val


def densify(indptr, indices, data, n_cols: int) -> np.ndarray:
    """Dense float32 ``[len(indptr) - 1, n_cols]`` of a CSR matrix."""
    out = np.zeros((len(indptr) - 1, n_cols), dtype=np.float32)
    _jit()["densify"](indptr, indices, data, out)
    return out


def expert_columns(indptr, indices, data, rows_per_expert: int, n_cols: int) -> tuple:
    """Column-major copy of each expert's ``rows_per_expert`` rows of a CSR matrix.

    Returns ``(cptr [E, n_cols + 1] int64, crow int32, cval float32)``: the non-zeros of column ``c`` in
    expert block ``j`` are ``crow/cval[cptr[j, c]:cptr[j, c + 1]]`` (global row numbers, increasing), so the
    kernels below sum in the same order as over the CSR rows.
    """
    n_exp = (len(indptr) - 1) // rows_per_expert
    nnz = int(indptr[n_exp * rows_per_expert] - indptr[0])
    cptr = np.empty((n_exp, n_cols + 1), dtype=np.int64)
    crow = np.empty(nnz, dtype=np.int32)
    cval = np.empty(nnz, dtype=np.float32)
    _jit()["columns"](indptr, indices, data, rows_per_expert, n_exp, n_cols, cptr, crow, cval)
    return cptr, crow, cval


def _n_threads() -> int:
    import numba

    return numba.get_num_threads()


def stacked_spmm(indptr, indices, data, w: np.ndarray, rows_per_expert: int, columns: tuple | None = None
                 ) -> np.ndarray:
    """``[E·B, P]``: row ``i`` of the CSR times ``w[i // B]`` (``w`` is ``[E, G, P]`` float32).

    Column by column within each expert (``columns`` from :func:`expert_columns`, built here if not given):
    each row of ``w[e]`` is read once per step rather than once per non-zero. Experts are split into blocks
    of rows when there are fewer experts than threads.
    """
    if columns is None:
        columns = expert_columns(indptr, indices, data, rows_per_expert, w.shape[1])
    n_exp = columns[0].shape[0]
    out = np.empty((n_exp * rows_per_expert, w.shape[2]), dtype=np.float32)
    blocks = max(1, min(rows_per_expert, -(-_n_threads() // max(n_exp, 1))))
    _jit()["spmm"](*columns, w, rows_per_expert, out, -(-rows_per_expert // blocks))
    return out


def stacked_spmm_wgrad(indptr, indices, data, dout: np.ndarray, rows_per_expert: int, n_cols: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """``[E, G, P]`` gradient of :func:`stacked_spmm` with respect to ``w``."""
    n_exp = (len(indptr) - 1) // rows_per_expert
    if out is None:
        out = np.empty((n_exp, n_cols, dout.shape[1]), dtype=np.float32)
    _jit()["wgrad"](indptr, indices, data, dout, rows_per_expert, out)
    return out


def sparse_wgrad_adamw(indptr, indices, data, dout: np.ndarray, rows_per_expert: int, experts: np.ndarray,
                       w: np.ndarray, m: np.ndarray, v: np.ndarray, lr, bc1, bc2_sqrt, *, beta1: float,
                       beta2: float, weight_decay: float, eps: float, columns: tuple | None = None) -> None:
    """Weight gradient of :func:`stacked_spmm` fused with AdamW, column by column.

    The gradient row ``dW[c] = Σ_i x[i, c] · dout[i]`` of expert ``experts[j]`` (rows ``j·B … (j+1)·B - 1``)
    is built in a ``P``-vector from the column-major copy (``columns``, see :func:`expert_columns`) and applied
    at once to ``w``, ``m``, ``v`` (``[E, G, P]`` float32, updated in place): no gradient array is stored
    at all, and ``w``, ``m``, ``v`` are each traversed once. Tasks are (expert, block of 256 columns).

    Same arithmetic as ``torch._fused_adamw_`` with per-expert ``lr``, ``bc1 = 1 - beta1**t`` and
    ``bc2_sqrt = sqrt(1 - beta2**t)``.
    """
    if columns is None:
        columns = expert_columns(indptr, indices, data, rows_per_expert, w.shape[1])
    f64 = np.float64
    _jit()["wgrad_adamw"](*columns, dout, np.asarray(experts, dtype=np.int64), w, m, v, np.asarray(lr, f64),
                          np.asarray(bc1, f64), np.asarray(bc2_sqrt, f64), f64(beta1), f64(beta2),
                          f64(weight_decay), f64(eps), 256)


def row_sums(indptr, data) -> np.ndarray:
    """Float64 sum of each row of a CSR matrix."""
    out = np.empty(len(indptr) - 1, dtype=np.float64)
    _jit()["row_sums"](indptr, data, out)
    return out
