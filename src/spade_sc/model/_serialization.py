"""Save / load :class:`~spade_sc.SpadeModel` as ``config.json`` + ``model.safetensors`` (no pickle)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["save_model", "load_model", "FORMAT_VERSION"]

from ._spade_model import _CONFIG, _WEIGHTS, FORMAT_VERSION, _hyper_defaults


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_model(model, path: Path, *, overwrite: bool = False) -> None:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{str(path)!r} exists and is not a directory; choose another path.")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{str(path)!r} already exists and is not empty; pass `overwrite=True` to replace the model in it."
            )
    tensors = {f"image.{k}": v for k, v in model.pairs_.image.state_dict().items()}
    tensors.update({f"expression.{k}": v for k, v in model.pairs_.expression.state_dict().items()})
    tensors["centroids"] = torch.from_numpy(np.ascontiguousarray(model.centroids_, dtype=np.float32))
    tensors["centroid_to_expert"] = torch.from_numpy(np.ascontiguousarray(model.centroid_to_expert_, dtype=np.int64))
    config = {
        "format": "spade_sc.SpadeModel",
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "hyperparameters": model.params,
        "feature_dim": model.feature_dim_,
        "n_experts": model.n_experts_,
        "distance_scale": model.distance_scale_,
        "genes": [str(g) for g in model.genes_],
        "centroid_group": [str(g) for g in model.centroid_group_],
        "history": None if model.history_ is None else model.history_.to_dict(orient="list"),
    }
    # write into a temporary sibling directory, then move the files in: a failure leaves no half model
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, _WEIGHTS))
        with open(os.path.join(tmp, _CONFIG), "w") as f:
            json.dump(config, f, indent=1, default=_json_default)
        for name in (_WEIGHTS, _CONFIG):
            os.replace(os.path.join(tmp, name), path / name)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and np.isnan(o):
        return None
    raise TypeError(f"cannot store {type(o).__name__} in config.json")


def load_model(cls, path: Path, *, device: str | None = None):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ._heads import ExpertPairs

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {str(path)!r}; pass the directory given to `model.save`.")
    cfg_path, w_path = path / _CONFIG, path / _WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(
                f"{str(p)!r} is missing; {str(path)!r} is not a complete spade_sc model directory "
                f"(it needs {_CONFIG} and {_WEIGHTS})."
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON ({e}); the model directory is corrupt.") from e
    if not isinstance(cfg, dict) or cfg.get("format") != "spade_sc.SpadeModel":
        raise ValueError(f"{str(cfg_path)!r} is not a spade_sc model config.")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"this model was saved in format version {version} by spade_sc {cfg.get('package_version')}, newer "
            f"than this spade_sc ({_package_version()}, format {FORMAT_VERSION}) can read; upgrade with "
            "`pip install -U spade_sc`."
        )
    missing = [k for k in ("hyperparameters", "feature_dim", "n_experts", "distance_scale", "genes") if k not in cfg]
    if missing:
        raise ValueError(f"{str(cfg_path)!r} lacks {missing}; the model directory is corrupt, save the model again.")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(w_path)!r} could not be read ({e}); the model directory is corrupt.") from e
    missing = [k for k in ("centroids", "centroid_to_expert") if k not in tensors]
    if missing:
        raise ValueError(f"{str(w_path)!r} lacks {missing}; the model directory is corrupt, save the model again.")
    hyper = _hyper_defaults()
    hyper.update(cfg["hyperparameters"])
    model = cls(device=device, **hyper)
    centroids = tensors["centroids"].numpy()
    c2e = tensors["centroid_to_expert"].numpy().astype(np.int64)
    n_exp = int(cfg["n_experts"])
    genes = np.asarray(cfg["genes"], dtype=str)
    pairs = ExpertPairs(n_exp, int(cfg["feature_dim"]), len(genes), hyper["proj_dim"], hyper["dropout"])
    try:
        pairs.image.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("image.")})
        pairs.expression.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("expression.")})
    except RuntimeError as e:
        raise ValueError(f"weights in {str(w_path)!r} do not match {str(cfg_path)!r}: {e}") from e
    model.pairs_ = pairs.eval()
    model.centroids_ = centroids
    model.centroid_to_expert_ = c2e
    model.centroid_group_ = np.asarray(cfg.get("centroid_group") or ["all"] * len(centroids), dtype=str)
    model.distance_scale_ = float(cfg["distance_scale"])
    model.genes_ = genes
    model.feature_dim_ = int(cfg["feature_dim"])
    hist = cfg.get("history")
    model.history_ = None if hist is None else pd.DataFrame(hist)
    return model
