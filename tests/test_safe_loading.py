"""Nothing spade_sc loads can run code: our format is safetensors + JSON; foreign torch files: weights_only.

A "malicious" pickle here is one whose unpickling calls ``os.mkdir(marker)``: harmless, but observable. Each
test checks that the loader refuses it with a clear error and that the marker was never created; one control
shows that plain ``torch.load(weights_only=False)`` of the same file does run the code.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spade_sc as ss

SRC = Path(ss.__file__).resolve().parent
FIT = {"n_prototypes": 4, "n_experts": 2, "proj_dim": 8, "max_epochs": 1, "batch_size": 64, "device": "cpu"}


class _Payload:
    """Unpickling this calls ``os.mkdir(path)``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _head(d, p=4):
    return {
        "projection.weight": torch.randn(p, d),
        "projection.bias": torch.randn(p),
        "fc.weight": torch.randn(p, p),
        "fc.bias": torch.randn(p),
        "layer_norm.weight": torch.ones(p),
        "layer_norm.bias": torch.zeros(p),
    }


def _malicious_pt(path: Path, marker: Path) -> Path:
    sd = {f"image_projection.{k}": v for k, v in _head(6).items()}
    sd.update({f"spot_projection.{k}": v for k, v in _head(5).items()})
    torch.save({"model": sd, "extra": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def fitted():
    adata = ss.datasets.toy(random_state=2, n_slides=2, grid=8)
    return adata, ss.tl.fit_spade(adata.copy(), **FIT)


# ------------------------------------------------------------------------------------------ our own format
def test_saved_model_is_safetensors_and_json_only(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format"] == "spade_sc.SpadeModel" and cfg["format_version"] == ss.model.FORMAT_VERSION
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
    header = json.loads(raw[8 : 8 + n])
    assert {"centroids", "centroid_to_expert"} <= set(header)
    assert all(v["dtype"] in ("F32", "I64") for k, v in header.items() if k != "__metadata__")


def test_load_never_unpickles(fitted, tmp_path, monkeypatch):
    adata, model = fitted
    model.save(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("a loader unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    back = ss.SpadeModel.load(tmp_path / "m")
    np.testing.assert_array_equal(back.get_embedding(adata)[0], model.get_embedding(adata)[0])


def test_pickle_disguised_as_model_weights_is_refused(fitted, tmp_path):
    _, model = fitted
    model.save(tmp_path / "m")
    marker = tmp_path / "pwned"
    with open(tmp_path / "m" / "model.safetensors", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="could not be read.*corrupt"):
        ss.SpadeModel.load(tmp_path / "m")
    assert not marker.exists()


def test_pickle_disguised_as_training_checkpoint_is_refused(fitted, tmp_path):
    adata, _ = fitted
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    with open(ckpt / "trainer_state.safetensors", "wb") as f:
        pickle.dump({"w": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="corrupt checkpoint.*delete"):
        ss.tl.fit_spade(adata.copy(), checkpoint_dir=ckpt, **FIT)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- foreign torch files
def test_malicious_release_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _malicious_pt(tmp_path / "expert_0.pt", marker)
    with pytest.raises(ValueError, match="refused to load.*weights_only=True"):
        ss.SpadeModel.from_spade_checkpoints(
            [evil], np.zeros((2, 6), np.float32), np.zeros(2, int), genes=list("abcde")
        )
    assert not marker.exists()
    # control: the file really is malicious, an unguarded torch.load runs its code
    torch.load(evil, weights_only=False)
    assert marker.is_dir()


def test_malicious_encoder_weights_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2, 3)}, "extra": _Payload(marker)}, evil)
    adata = ss.datasets.toy(random_state=2, n_slides=1, grid=4)
    with pytest.raises(ValueError, match="weights_only=True"):
        ss.pp.extract_features(adata, model=nn.Linear(3, 2), weights=evil, patch_size=8, mpp=4.0)
    assert not marker.exists()
    assert "X_image" in adata.obsm and adata.obsm["X_image"].shape[1] == 64  # untouched


def test_object_npy_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "reassigned_clusters.npy"
    np.save(path, np.array([_Payload(marker), 0], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="does not unpickle"):
        ss.SpadeModel.from_spade_checkpoints(
            [tmp_path / "unused.pt"], np.zeros((2, 6), np.float32), path, genes=list("abcde")
        )
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ static guard
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            yield owner, name, kw, node.lineno


def test_no_unsafe_deserialisation_in_the_package():
    """Every ``torch.load`` passes ``weights_only=True``; no pickle, joblib or ``allow_pickle=True`` loads."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for owner, name, kw, line in _calls(tree):
            where = f"{path.relative_to(SRC)}:{line}"
            if owner == "torch" and name == "load":
                ok = (
                    "weights_only" in kw
                    and isinstance(kw["weights_only"], ast.Constant)
                    and kw["weights_only"].value is True
                )
                if not ok:
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if "allow_pickle" in kw and not (
                isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False
            ):
                problems.append(f"{where}: allow_pickle not False")
    assert not problems, problems
