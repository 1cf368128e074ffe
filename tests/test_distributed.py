"""Multi-process fit and feature extraction (torchrun, 2 CPU processes, gloo) equal one process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import spade_sc as ss
from spade_sc.model._distributed import balanced_owners, shard_by_slide

FIT_KW = dict(batch_key="slide", n_prototypes=6, n_experts=3, max_epochs=2, proj_dim=8, batch_size=32,
              lr=1e-2, device="cpu")

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import spade_sc as ss
    from safetensors.torch import save_file

    ss.settings.progress_bar = False
    out = sys.argv[1]
    fit_kw = json.loads(sys.argv[2])
    adata = ss.datasets.toy(random_state=1, n_slides=3, grid=10)

    def color_stats(batch):  # a cheap "encoder": per-channel mean and std of the uint8 patch
        b = batch.astype(np.float32) / 255
        return np.concatenate([b.mean((1, 2)), b.std((1, 2))], axis=1)

    from spade_sc.model._distributed import extract_features_distributed
    extract_features_distributed(adata, slide_key="library_id", model=color_stats, key_added="X_stats",
                                 patch_size=32, device="cpu")
    model = ss.tl.fit_spade(adata, **fit_kw)
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.pairs_.state_dict().items()}, os.path.join(out, "pairs.safetensors"))
        np.save(os.path.join(out, "stats.npy"), adata.obsm["X_stats"])
        model.history_.to_csv(os.path.join(out, "history.csv"), index=False)
        np.save(os.path.join(out, "labels.npy"), model.train_labels_["expert"].to_numpy())
    else:
        np.save(os.path.join(out, "stats_rank1.npy"), adata.obsm["X_stats"])
    dist.destroy_process_group()
    """
)


def test_balanced_owners_and_slide_shards():
    owners = balanced_owners([100, 60, 50, 10, 5], 2)
    loads = [sum(s for s, o in zip([100, 60, 50, 10, 5], owners, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [110, 115]  # LPT: 100+10+5 | 60+50
    slides = np.array(["b", "a", "c", "a", "b", "d"])
    shards = [shard_by_slide(slides, r, 2) for r in range(2)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(6))
    assert set(slides[shards[0]]) == {"a", "c"} and set(slides[shards[1]]) == {"b", "d"}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_torchrun_two_processes_equal_one(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", str(script), str(out), json.dumps(FIT_KW)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    from safetensors.torch import load_file

    # one process, same data and settings
    adata = ss.datasets.toy(random_state=1, n_slides=3, grid=10)
    model = ss.tl.fit_spade(adata, **FIT_KW)
    got = load_file(str(out / "pairs.safetensors"))
    for k, v in model.pairs_.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), model.train_labels_["expert"].to_numpy())
    import pandas as pd

    hist = pd.read_csv(out / "history.csv")
    np.testing.assert_allclose(hist["train_loss"], model.history_["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(hist["val_loss"], model.history_["val_loss"], rtol=1e-4)

    # sharded extraction: every rank ends with all features, equal to one process's
    def color_stats(batch):
        b = batch.astype(np.float32) / 255
        return np.concatenate([b.mean((1, 2)), b.std((1, 2))], axis=1)

    ss.pp.extract_features(adata, model=color_stats, key_added="X_stats", patch_size=32, device="cpu")
    np.testing.assert_allclose(np.load(out / "stats.npy"), adata.obsm["X_stats"], rtol=1e-6)
    np.testing.assert_allclose(np.load(out / "stats_rank1.npy"), adata.obsm["X_stats"], rtol=1e-6)
