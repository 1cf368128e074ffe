"""Checkpointed fits: atomic writes, resume after SIGKILL, refusal of foreign or corrupt checkpoints.

The kill/resume test runs the fit in subprocesses that SIGKILL themselves at chosen points (after a
checkpoint is written, and in the middle of writing one), then resumes in a fresh process and compares the
final weights with an uninterrupted fit of the same seed, bit for bit (CPU, one thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.torch import load_file

import spade_sc as ss

FIT = {
    "n_prototypes": 4,
    "n_experts": 2,
    "proj_dim": 16,
    "max_epochs": 6,
    "batch_size": 32,
    "patience": 3,
    "lr": 1e-3,
    "batch_key": "slide",
    "device": "cpu",
    "random_state": 3,
}

_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import spade_sc as ss
    from spade_sc.model import _trainer

    mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    fit = json.loads(sys.argv[4])
    ss.settings.progress_bar = False
    adata = ss.datasets.toy(random_state=1, n_slides=3, grid=8)

    saves = {"n": 0, "kill_now": False}
    original_save = _trainer._atomic_save
    original_replace = os.replace

    def counting_save(*args, **kwargs):
        saves["n"] += 1
        saves["kill_now"] = mode == "kill-mid" and saves["n"] == 2
        original_save(*args, **kwargs)
        if mode == "kill-after" and saves["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # right after the 2nd checkpoint is complete

    def killing_replace(src, dst):
        original_replace(src, dst)
        if saves["kill_now"]:
            os.kill(os.getpid(), signal.SIGKILL)  # in the middle of writing the 2nd checkpoint

    _trainer._atomic_save = counting_save
    os.replace = killing_replace
    model = ss.tl.fit_spade(adata, checkpoint_dir=ckpt, **fit)
    os.replace = original_replace
    model.save(os.path.join(out, "resumed"))
    ref = ss.tl.fit_spade(adata.copy(), **fit)  # the same fit, uninterrupted and without checkpoints
    ref.save(os.path.join(out, "reference"))
    print(json.dumps({"saves": saves["n"]}))
    """
)


def _run(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path / "ckpt"), str(tmp_path), json.dumps(FIT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _epoch(tmp_path) -> int:
    return json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["epoch"]


def test_sigkill_and_resume_gives_identical_weights(tmp_path):
    # 1) killed right after the checkpoint of epoch 1 is written
    r = _run(tmp_path, "kill-after")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _epoch(tmp_path) == 1
    # 2) resumed at epoch 2, killed in the middle of writing the checkpoint of epoch 3
    r = _run(tmp_path, "kill-mid")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # 3) resumed again; runs to the end, then fits the same model uninterrupted in the same process
    r = _run(tmp_path, "finish")
    assert r.returncode == 0, r.stderr[-3000:]
    saves = json.loads(r.stdout.strip().splitlines()[-1])["saves"]
    # the kill came after the new checkpoint file was renamed into place: it is complete and self-consistent
    # (weights and training state in one file), so the fit resumed after epoch 3 and trained epochs 4 and 5
    assert saves == FIT["max_epochs"] - 4
    assert _epoch(tmp_path) == FIT["max_epochs"] - 1

    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert resumed[k].equal(reference[k]), k
    h_res = json.loads((tmp_path / "resumed" / "config.json").read_text())["history"]
    h_ref = json.loads((tmp_path / "reference" / "config.json").read_text())["history"]
    np.testing.assert_array_equal(np.asarray(h_res["train_loss"]), np.asarray(h_ref["train_loss"]))
    assert len(h_res["epoch"]) == FIT["max_epochs"] * FIT["n_experts"]
    # nothing half-written is left behind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "trainer_state.json",
        "trainer_state.safetensors",
    ]


# ------------------------------------------------------------------------------- in-process checks
SMALL = {"n_prototypes": 4, "n_experts": 2, "proj_dim": 8, "max_epochs": 2, "batch_size": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_master():
    return ss.datasets.toy(random_state=2, n_slides=2, grid=8)


@pytest.fixture
def tiny(tiny_master):
    return tiny_master.copy()


def _weights(model):
    return {k: v.clone() for k, v in model.pairs_.state_dict().items()}


def test_finished_checkpoint_is_reused(tiny, tmp_path):
    m1 = ss.tl.fit_spade(tiny, checkpoint_dir=tmp_path / "c", **SMALL)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["trainer_state.json", "trainer_state.safetensors"]
    m2 = ss.tl.fit_spade(tiny.copy(), checkpoint_dir=tmp_path / "c", **SMALL)
    for k, v in _weights(m1).items():
        assert v.equal(m2.pairs_.state_dict()[k])
    assert m1.history_.equals(m2.history_)


def test_checkpoint_of_another_fit_is_refused(tiny, tiny_master, tmp_path):
    ss.tl.fit_spade(tiny, checkpoint_dir=tmp_path / "c", **SMALL)
    other = tiny_master.copy()
    before = other.obs.copy()
    with pytest.raises(ValueError, match="different fit.*empty directory"):
        ss.tl.fit_spade(other, checkpoint_dir=tmp_path / "c", **(SMALL | {"lr": 5e-4}))
    assert other.obs.equals(before) and "spade" not in other.uns


def test_corrupt_checkpoint_is_refused(tiny, tiny_master, tmp_path):
    ss.tl.fit_spade(tiny, checkpoint_dir=tmp_path / "c", **SMALL)
    state = tmp_path / "c" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    other = tiny_master.copy()
    with pytest.raises(ValueError, match="corrupt.*delete"):
        ss.tl.fit_spade(other, checkpoint_dir=tmp_path / "c", **SMALL)
    assert "spade" not in other.uns


def test_checkpoint_dir_is_a_file(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises((ValueError, NotADirectoryError, FileExistsError), match="directory"):
        ss.tl.fit_spade(tiny, checkpoint_dir=f, **SMALL)
    assert "spade_expert" not in tiny.obs
