"""Import the SPADE authors' released checkpoints into a :class:`~spade_sc.SpadeModel`.

The authors' release (Redekop, Pleasure et al. 2025) holds, for a model of ``E`` experts and ``K`` stage-1
prototypes:

- one ``.pt`` file per expert, written by ``torch.save({"model": model.state_dict(), ...})`` of a BLEEP
  model, whose ``image_projection.*`` and ``spot_projection.*`` entries are the image and expression
  :class:`~spade_sc.model.ProjectionHead` (``projection``, ``gelu``, ``fc``, ``dropout``, ``layer_norm``);
  other entries (an ``image_encoder.*``, optimiser state, epoch counters) are ignored;
- ``centroids.npy``: ``[K, D]`` stage-1 centroids of the image features;
- ``reassigned_clusters.npy``: ``[K]`` expert of each centroid.

Their routing is ``softmax_k(-d_k / tau)`` over the raw Euclidean distances ``d_k`` to all centroids, summed
per expert, so the imported model has ``distance_scale_ = 1``.

The ``.pt`` files are read with ``torch.load(..., weights_only=True)``: a file that would need to run code
to be unpickled is refused, never executed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["from_spade_checkpoints", "read_expert_checkpoint"]

_HEADS = {"image": "image_projection.", "expression": "spot_projection."}
_HEAD_KEYS = (
    "projection.weight",
    "projection.bias",
    "fc.weight",
    "fc.bias",
    "layer_norm.weight",
    "layer_norm.bias",
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / torch.compile


def _load_array(value, name: str, suffix_hint: str) -> np.ndarray:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(
                f"`{name}`: no file at {str(path)!r}; pass the path of the authors' {suffix_hint}."
            )
        try:
            # allow_pickle=False: an object array in a .npy would need pickle, which we refuse
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(
                f"`{name}`: {str(path)!r} is not a plain numeric .npy array ({e}); spade_sc does not "
                "unpickle "
                f"arrays. Re-save it with `np.save(path, np.asarray(arr, dtype=float))`."
            ) from e
    return np.asarray(value)


def read_expert_checkpoint(path: str | os.PathLike) -> dict:
    """Read one expert ``.pt`` file safely and return its two heads' state dicts.

    Parameters
    ----------
    path
        A file written by ``torch.save({"model": state_dict, ...})`` (a bare ``state_dict`` works too).

    Returns
    -------
    ``{"image": {...}, "expression": {...}}``, each a ``ProjectionHead`` state dict (``projection.weight``,
    ``projection.bias``, ``fc.weight``, ``fc.bias``, ``layer_norm.weight``, ``layer_norm.bias``).

    Raises
    ------
    ValueError
        If the file holds anything that needs code execution to load (refused by ``weights_only=True``), or
        if it lacks the ``image_projection.*`` / ``spot_projection.*`` heads.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no expert checkpoint at {str(path)!r}; pass one `.pt` file per expert.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refused to load {str(path)!r}: it contains Python objects other than tensors and plain "
            "containers, "
            "and unpickling them could run arbitrary code. spade_sc loads checkpoints with "
            "`torch.load(..., weights_only=True)` only. If you trust the file, re-save just its weights: "
            "`torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)`."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({e}); the file may be truncated."
        ) from e
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict; expected the authors' format "
            "`{'model': model.state_dict(), ...}`."
        )
    clean = {}
    for key, value in state.items():
        key = str(key)
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        clean[key] = value
    out = {}
    for which, prefix in _HEADS.items():
        head = {k[len(prefix) :]: v for k, v in clean.items() if k.startswith(prefix)}
        missing = [k for k in _HEAD_KEYS if k not in head]
        if missing:
            found = sorted({k.split(".")[0] for k in clean})[:10]
            raise ValueError(
                f"{str(path)!r} has no complete `{prefix}*` head "
                f"(missing {', '.join(prefix + m for m in missing)}; "
                f"top-level names found: {found}); expected a SPADE/BLEEP expert checkpoint."
            )
        for k in _HEAD_KEYS:
            if not isinstance(head[k], torch.Tensor) or not head[k].is_floating_point():
                raise ValueError(f"`{prefix}{k}` in {str(path)!r} is not a floating-point tensor.")
        out[which] = {k: head[k].detach().float() for k in _HEAD_KEYS}
    return out


def _head_dims(head: dict, which: str, path) -> tuple[int, int]:
    w1, b1, w2, b2 = (head[k] for k in _HEAD_KEYS[:4])
    g, beta = head["layer_norm.weight"], head["layer_norm.bias"]
    if w1.dim() != 2:
        raise ValueError(
            f"`{which}` head in {str(path)!r}: `projection.weight` must be 2-D, got {tuple(w1.shape)}."
        )
    p, d = w1.shape
    if (
        tuple(b1.shape) != (p,)
        or tuple(w2.shape) != (p, p)
        or tuple(b2.shape) != (p,)
        or g.shape != b1.shape
        or (beta.shape != b1.shape)
    ):
        raise ValueError(
            f"`{which}` head in {str(path)!r} has inconsistent shapes ("
            + ", ".join(f"{k}: {tuple(head[k].shape)}" for k in _HEAD_KEYS)
            + "); "
            "the file is not a BLEEP ProjectionHead."
        )
    return int(d), int(p)


def from_spade_checkpoints(
    cls,
    expert_files: Sequence[str | os.PathLike],
    centroids: str | os.PathLike | np.ndarray,
    centroid_to_expert: str | os.PathLike | np.ndarray,
    *,
    genes: Sequence[str],
    centroid_group: Sequence[str] | None = None,
    normalize: bool = False,
    target_sum: float = 1e4,
    dropout: float = 0.1,
    device: str | None = None,
):
    """Build a :class:`~spade_sc.SpadeModel` from the SPADE authors' released checkpoints.

    Parameters
    ----------
    cls
        The model class (:class:`~spade_sc.SpadeModel`); supplied by
        :meth:`SpadeModel.from_spade_checkpoints <spade_sc.SpadeModel.from_spade_checkpoints>`.
    expert_files
        One ``.pt`` file per expert, in expert order (file ``e`` is expert ``e``). Each holds
        ``{"model": state_dict, ...}`` with ``image_projection.*`` and ``spot_projection.*`` heads; it is read
        with ``torch.load(..., weights_only=True)``, so a file that needs code execution is refused.
    centroids
        ``centroids.npy`` (path or array), ``[K, D]`` stage-1 centroids; ``D`` is the image feature size.
    centroid_to_expert
        ``reassigned_clusters.npy`` (path or array), ``[K]`` expert index of each centroid.
    genes
        The gene panel in the order of the expression head's inputs (the ``.pt`` files do not record it).
    centroid_group
        Optional group (organ) of each centroid, for bookkeeping; ``"all"`` when ``None``.
    normalize
        How the expression heads expect their input for ``modality="expression"``: ``False`` (default, the
        authors' code) uses the layer as it is; ``True`` applies ``log1p`` of counts scaled to ``target_sum``.
    target_sum
        Counts per spot when ``normalize=True``.
    dropout
        Dropout recorded in the heads (inactive at inference).
    device
        Torch device of the returned model.

    Returns
    -------
    A fitted :class:`~spade_sc.SpadeModel` with ``distance_scale_ = 1`` (the authors' raw distances): its
    routing is ``softmax_k(-d_k / tau)`` summed per expert, and ``get_embedding`` is the routing-weighted sum
    of the experts' heads. It can be saved with :meth:`~spade_sc.SpadeModel.save` (safetensors + JSON).

    Raises
    ------
    ValueError
        If a file is refused or malformed, or the files, centroids, expert map and ``genes`` disagree in size.

    Examples
    --------
    >>> import spade_sc as ss
    >>> files = [f"spade_release/expert_{e}.pt" for e in range(16)]  # doctest: +SKIP
    >>> model = ss.SpadeModel.from_spade_checkpoints(
    ...     files, "spade_release/centroids.npy", "spade_release/reassigned_clusters.npy", genes=panel
    ... )  # doctest: +SKIP
    >>> ss.tl.embed(adata, model, tau=0.1)  # doctest: +SKIP
    """
    import torch

    from .._validate import check_fraction, check_positive
    from ._heads import ExpertPairs

    if isinstance(expert_files, (str, os.PathLike)):
        raise TypeError(
            "`expert_files` must be a list of paths, one `.pt` file per expert in expert order, "
            f"got a single path {str(expert_files)!r}."
        )
    expert_files = list(expert_files)
    n_experts = len(expert_files)
    if n_experts == 0:
        raise ValueError("`expert_files` is empty; pass one `.pt` file per expert.")
    check_fraction("dropout", dropout)
    check_positive("target_sum", target_sum)
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be True or False, got {normalize!r}.")
    if isinstance(genes, str):
        raise TypeError("`genes` must be a list of gene names, not a single string.")
    genes = np.asarray([str(g) for g in genes], dtype=str)
    if len(genes) == 0:
        raise ValueError(
            "`genes` is empty; pass the gene panel the expression heads were trained on, in order."
        )
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if (genes == g).sum() > 1})[:5]
        raise ValueError(f"`genes` has duplicated names (e.g. {dup}); pass each gene of the panel once.")

    c = _load_array(centroids, "centroids", "centroids.npy")
    if c.ndim != 2 or not np.issubdtype(c.dtype, np.number) or c.shape[0] == 0:
        raise ValueError(
            f"`centroids` must be a numeric [K, D] array with K ≥ 1, got shape {c.shape} ({c.dtype})."
        )
    if not np.isfinite(c).all():
        raise ValueError("`centroids` contains NaN or infinite values; the file is corrupt.")
    c2e = _load_array(centroid_to_expert, "centroid_to_expert", "reassigned_clusters.npy")
    if c2e.ndim != 1 or len(c2e) != len(c):
        raise ValueError(
            f"`centroid_to_expert` must have one entry per centroid ({len(c)}), got shape {c2e.shape}; pass "
            "`reassigned_clusters.npy` from the same release as `centroids.npy`."
        )
    if not (
        np.issubdtype(c2e.dtype, np.integer)
        or (
            np.issubdtype(c2e.dtype, np.floating)
            and np.all(np.isfinite(c2e))
            and np.all(c2e == np.round(c2e))
        )
    ):
        raise ValueError(f"`centroid_to_expert` must hold integer expert indices, got dtype {c2e.dtype}.")
    c2e = c2e.astype(np.int64)
    if c2e.min() < 0 or c2e.max() >= n_experts:
        raise ValueError(
            f"`centroid_to_expert` names experts {int(c2e.min())}..{int(c2e.max())} but {n_experts} expert "
            "files "
            f"were given (experts 0..{n_experts - 1}); pass one file per expert, in expert order."
        )
    unused = np.setdiff1d(np.arange(n_experts), c2e)
    if len(unused):
        raise ValueError(
            f"expert(s) {unused.tolist()} own no centroid in `centroid_to_expert`, so they could never be "
            "routed "
            "to; check that `expert_files` are in expert order and match `reassigned_clusters.npy`."
        )
    if centroid_group is None:
        groups = np.full(len(c), "all")
    else:
        groups = np.asarray([str(g) for g in centroid_group], dtype=str)
        if len(groups) != len(c):
            raise ValueError(
                f"`centroid_group` must have one entry per centroid ({len(c)}), got {len(groups)}."
            )

    feature_dim = c.shape[1]
    heads = []
    proj_dim = None
    for e, path in enumerate(expert_files):
        h = read_expert_checkpoint(path)
        d_img, p_img = _head_dims(h["image"], "image_projection", path)
        d_expr, p_expr = _head_dims(h["expression"], "spot_projection", path)
        if d_img != feature_dim:
            raise ValueError(
                f"expert {e} ({str(path)!r}) expects {d_img}-d image features but the centroids are "
                f"{feature_dim}-d; "
                "pass the centroids of the same release (the same image encoder)."
            )
        if d_expr != len(genes):
            raise ValueError(
                f"expert {e} ({str(path)!r}) expects {d_expr} genes but `genes` has {len(genes)}; pass the "
                "gene "
                "panel the model was trained on, in its order."
            )
        if p_img != p_expr or (proj_dim is not None and p_img != proj_dim):
            raise ValueError(
                f"expert {e} ({str(path)!r}) projects to {p_img}/{p_expr} dimensions (image/expression), "
                "other "
                f"experts to {proj_dim}; all experts of a release share one joint space."
            )
        proj_dim = p_img
        heads.append(h)

    model = cls(
        device=device,
        n_prototypes=len(c),
        n_experts=n_experts,
        proj_dim=int(proj_dim),
        dropout=dropout,
        normalize=normalize,
        target_sum=target_sum,
    )
    pairs = ExpertPairs(n_experts, feature_dim, len(genes), int(proj_dim), dropout)
    with torch.no_grad():
        for e, h in enumerate(heads):
            pairs.image.load_single(e, h["image"])
            pairs.expression.load_single(e, h["expression"])
    model.pairs_ = pairs.eval()
    model.centroids_ = np.ascontiguousarray(c, dtype=np.float32)
    model.centroid_to_expert_ = c2e
    model.centroid_group_ = groups
    model.distance_scale_ = 1.0
    model.genes_ = genes
    model.feature_dim_ = int(feature_dim)
    model.history_ = None
    return model
