"""Input checks. Each raises ``ValueError``/``KeyError``/``TypeError`` with the fix in the message.

None of these functions modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def check_anndata(adata) -> AnnData:
    """Raise ``TypeError`` unless ``adata`` is an AnnData, ``ValueError`` if it is empty."""
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"expected an AnnData (or a SpatialData with `table_key=`), got {type(adata).__name__}."
        )
    if adata.n_obs == 0:
        raise ValueError("`adata` has no observations (n_obs == 0); pass a non-empty AnnData.")
    return adata


def is_out_of_core(x) -> bool:
    """True for array-likes read on demand (zarr, h5py, dask, AnnData backed datasets); False for NumPy
    arrays (memmaps included) and SciPy sparse matrices."""
    return not (isinstance(x, np.ndarray) or sp.issparse(x))


def _row_blocks(x, chunk: int = 16384):
    """Consecutive row blocks of ``x`` as NumPy arrays or SciPy matrices (reads out-of-core stores in pieces)."""
    for s in range(0, x.shape[0], chunk):
        block = x[s : s + chunk]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
        yield s, (block if sp.issparse(block) else np.asarray(block))


def get_rep(adata: AnnData, use_rep: str, *, hint: str | None = None) -> np.ndarray:
    """Return ``adata.obsm[use_rep]`` as a 2-D array of finite numbers (a view where possible).

    Out-of-core arrays (zarr, h5py, dask) are checked block by block and returned as they are.
    """
    if use_rep not in adata.obsm:
        keys = ", ".join(map(repr, adata.obsm.keys())) or "none"
        fix = hint or "run `ss.pp.extract_features` first or pass `use_rep=` with one of the keys present"
        raise KeyError(f"no features in `adata.obsm[{use_rep!r}]` (obsm has: {keys}); {fix}.")
    x = adata.obsm[use_rep]
    if sp.issparse(x):
        x = x.toarray()
    if not is_out_of_core(x):
        x = np.asarray(x)
    if len(x.shape) != 2:
        raise ValueError(f"`adata.obsm[{use_rep!r}]` must be 2-D (n_obs × n_features), got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"`adata.obsm[{use_rep!r}]` must be numeric, got dtype {x.dtype}.")
    bad = np.zeros(x.shape[0], dtype=bool)
    for s, block in _row_blocks(x):  # in blocks: no n × d temporary
        bad[s : s + len(block)] = ~np.isfinite(block).all(axis=1)
    if bad.any():
        names = ", ".join(map(str, adata.obs_names[bad][:5]))
        raise ValueError(
            f"`adata.obsm[{use_rep!r}]` has NaN or infinite values in {int(bad.sum())} spots (e.g. {names}); "
            "drop those spots (e.g. `adata = adata[np.isfinite(adata.obsm[use_rep]).all(1)].copy()`) "
            "or recompute the features."
        )
    return x


def get_obs_column(adata: AnnData, key: str, *, what: str) -> np.ndarray:
    """Return ``adata.obs[key]`` as a string array, raising a ``KeyError`` that lists the columns."""
    if key not in adata.obs.columns:
        cols = ", ".join(map(repr, adata.obs.columns[:20])) or "none"
        raise KeyError(f"`{what}={key!r}` is not a column of `adata.obs`; pass one of its columns: {cols}.")
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"`adata.obs[{key!r}]` has {int(col.isna().sum())} missing values; fill or drop them.")
    return col.astype(str).to_numpy()


def get_counts(adata: AnnData, layer: str | None, *, require_counts: bool = False, hint: str | None = None):
    """Return ``adata.layers[layer]`` (or ``.X``) as CSR or a dense array; validate finiteness/sign.

    ``require_counts`` also refuses non-integer values; ``hint`` is appended to that message (the caller's
    way out, e.g. an option that accepts normalised data).
    """
    if layer is None:
        x = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            keys = ", ".join(map(repr, adata.layers.keys())) or "none"
            raise KeyError(
                f"`layer={layer!r}` is not in `adata.layers`; pass one of its layers ({keys}) or `layer=None` for `.X`."
            )
        x = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if x is None:
        raise ValueError(f"{where} is empty; pass `layer=` naming the counts.")
    if is_out_of_core(x):  # checked block by block, returned as it is
        for _, block in _row_blocks(x):
            _check_counts_values(block.data if sp.issparse(block) else block, where, require_counts, hint)
        return x
    _check_counts_values(x.data if sp.issparse(x) else np.asarray(x), where, require_counts, hint)
    return x


def _check_counts_values(data, where: str, require_counts: bool, hint: str | None) -> None:
    if not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"{where} must be numeric, got dtype {data.dtype}.")
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"{where} has NaN or infinite values; clean the expression matrix first.")
    if data.size and data.min() < 0:
        raise ValueError(
            f"{where} has negative values, so it is not counts (it looks scaled or centred); "
            "pass `layer=` naming raw counts (e.g. `layer='counts'`)."
        )
    if require_counts and data.size:
        sample = data[: min(data.size, 1_000_000)]
        if not np.allclose(sample, np.round(sample)):
            raise ValueError(
                f"{where} has non-integer values but raw counts are expected here; pass `layer=` naming "
                "raw counts (e.g. `layer='counts'`)" + (f", {hint}" if hint else "") + "."
            )


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive (or non-negative) finite number."""
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise TypeError(f"`{name}` must be {kind}, got {value!r}.")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")


def check_fraction(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` unless ``0 <= value < 1``."""
    check_positive(name, value, allow_zero=True)
    if value >= 1 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
