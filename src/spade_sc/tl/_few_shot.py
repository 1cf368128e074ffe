"""``tl.few_shot``: k-shot logistic-regression evaluation of embeddings, as SPADE and TANGLE report it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._utils import get_table
from .._validate import check_anndata, check_positive, get_obs_column, get_rep

__all__ = ["few_shot"]


def _pool(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, label_key: str, pool_key: str):
    """Mean feature and the (single) label of each group."""
    names = pd.unique(groups)
    pooled = np.empty((len(names), x.shape[1]), dtype=np.float64)
    out_labels = np.empty(len(names), dtype=object)
    for i, g in enumerate(names):
        m = groups == g
        lab = pd.unique(labels[m])
        if len(lab) != 1:
            raise ValueError(
                f"`{pool_key}={g!r}` has spots with {len(lab)} different `{label_key}` values ({', '.join(lab[:5])}); "
                f"slide-level evaluation needs one label per `{pool_key}` group."
            )
        pooled[i] = x[m].mean(0)
        out_labels[i] = lab[0]
    return pooled, out_labels.astype(str), names


def few_shot(
    adata,
    *,
    label_key: str,
    use_rep: str,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    n_repeats: int = 10,
    pool_key: str | None = None,
    C: float | None = None,
    max_iter: int = 10000,
    random_state: int | None = 0,
    return_repeats: bool = False,
    table_key: str | None = None,
) -> pd.DataFrame:
    """Few-shot classification of ``label_key`` from embeddings: k labelled examples per class.

    For every ``k`` in ``shots`` and each of ``n_repeats`` draws, ``k`` examples of every class are drawn at
    random (without replacement) for training and all other examples are the test set. A logistic regression
    with ``C = 2 · n_features / 100`` (the value of TANGLE's and SPADE's linear-probing code, which fixes the
    class count at 2 in that formula), ``max_iter=10000`` and no feature scaling is fitted; the test set is
    scored by balanced accuracy and macro one-vs-rest ROC AUC (plain ROC AUC of the positive class when there
    are two classes).

    Slide-level use: with ``pool_key`` (e.g. ``"slide"``) the examples are the mean-pooled embeddings of the
    spots of each ``pool_key`` group, and ``label_key`` must be constant within a group.

    A ``k`` for which some class has fewer than ``k + 1`` examples (none would be left to test) is skipped
    with a warning.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with embeddings in ``.obsm[use_rep]`` and labels in
        ``.obs[label_key]``. Not modified.
    label_key
        ``.obs`` column of class labels (at least 2 classes).
    use_rep
        ``.obsm`` key of the embeddings.
    shots
        Numbers of training examples per class.
    n_repeats
        Random draws per ``k``.
    pool_key
        ``.obs`` column to mean-pool spots by (slide-level evaluation); ``None`` uses spots.
    C
        Inverse regularisation of the logistic regression; ``None`` for ``2 · n_features / 100``.
    max_iter
        Iterations of the ``lbfgs`` solver.
    random_state
        Seed of the draws (a local generator; nothing global is seeded).
    return_repeats
        Return one row per draw (columns ``shots, repeat, balanced_accuracy, auc``) instead of the summary.
    table_key
        Table to use when ``adata`` is a SpatialData.

    Returns
    -------
    DataFrame with one row per ``k``: ``shots, n_train, n_test, balanced_accuracy_mean,
    balanced_accuracy_sd, auc_mean, auc_sd, n_repeats`` (``sd``: population standard deviation over the
    draws, as TANGLE reports it). Writes nothing.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> res = ss.tl.few_shot(adata, label_key="domain", use_rep="X_image", shots=(1, 4), n_repeats=3)
    >>> list(res["shots"])
    [1, 4]
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    table = check_anndata(get_table(adata, table_key))
    check_positive("n_repeats", n_repeats, integer=True)
    check_positive("max_iter", max_iter, integer=True)
    if C is not None:
        check_positive("C", C)
    if isinstance(shots, (int, np.integer)):
        shots = (int(shots),)
    shots = [int(k) for k in shots]
    if not shots:
        raise ValueError("`shots` is empty; pass e.g. `shots=(1, 2, 4, 8, 16)`.")
    for k in shots:
        check_positive("shots", k, integer=True)
    x = get_rep(table, use_rep).astype(np.float64)
    labels = get_obs_column(table, label_key, what="label_key")
    if pool_key is not None:
        groups = get_obs_column(table, pool_key, what="pool_key")
        x, labels, _ = _pool(x, labels, groups, label_key, pool_key)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"`adata.obs[{label_key!r}]` has only one class ({classes[0]!r}); few-shot needs ≥ 2."
        )
    usable = [k for k in shots if counts.min() >= k + 1]
    skipped = sorted(set(shots) - set(usable))
    if skipped:
        warnings.warn(
            f"skipping shots {skipped}: class {classes[counts.argmin()]!r} has only {counts.min()} examples "
            "(k-shot needs k + 1 to leave a test example).",
            UserWarning,
            stacklevel=2,
        )
    if not usable:
        raise ValueError(
            f"no `shots` value is possible: the smallest class ({classes[counts.argmin()]!r}) has {counts.min()} "
            "examples; pass smaller `shots`."
        )
    cost = C if C is not None else 2 * x.shape[1] / 100
    rng = np.random.default_rng(random_state)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    rows = []
    for k in usable:
        for rep in range(n_repeats):
            train = np.concatenate([rng.choice(idx, k, replace=False) for idx in by_class])
            test = np.setdiff1d(np.arange(len(labels)), train)
            clf = LogisticRegression(C=cost, max_iter=max_iter, random_state=0)
            clf.fit(x[train], labels[train])
            pred = clf.predict(x[test])
            proba = clf.predict_proba(x[test])
            bacc = balanced_accuracy_score(labels[test], pred)
            if len(classes) == 2:
                auc = roc_auc_score(labels[test] == clf.classes_[1], proba[:, 1])
            else:
                auc = roc_auc_score(
                    labels[test], proba, multi_class="ovr", average="macro", labels=clf.classes_
                )
            rows.append(
                {
                    "shots": k,
                    "repeat": rep,
                    "n_train": len(train),
                    "n_test": len(test),
                    "balanced_accuracy": float(bacc),
                    "auc": float(auc),
                }
            )
    per_draw = pd.DataFrame(rows)
    if return_repeats:
        return per_draw[["shots", "repeat", "n_train", "n_test", "balanced_accuracy", "auc"]]
    g = per_draw.groupby("shots", sort=False)
    out = pd.DataFrame(
        {
            "shots": usable,
            "n_train": g["n_train"].first().to_numpy(),
            "n_test": g["n_test"].first().to_numpy(),
            "balanced_accuracy_mean": g["balanced_accuracy"].mean().to_numpy(),
            "balanced_accuracy_sd": g["balanced_accuracy"].std(ddof=0).to_numpy(),
            "auc_mean": g["auc"].mean().to_numpy(),
            "auc_sd": g["auc"].std(ddof=0).to_numpy(),
            "n_repeats": n_repeats,
        }
    )
    return out
