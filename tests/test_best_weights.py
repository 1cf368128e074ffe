"""Best-validation weights kept on disk equal those kept in memory; training keeps each expert's best epoch."""

import numpy as np
import pytest
import torch

import spade_sc as ss
from spade_sc.model import _best_weights
from spade_sc.model._best_weights import BestWeights


def _state(seed, n_experts=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n_experts, 5, 4, generator=g),
        "b": torch.randn(n_experts, 4, generator=g),
        "s": torch.randn(n_experts, generator=g),  # one value per expert: 0-d rows
        "h": torch.randn(n_experts, 2, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("spill", [False, True])
def test_update_selected_experts_and_load(spill):
    first, second = _state(0), _state(1)
    best = BestWeights(first, spill=spill)
    assert best.on_disk is spill
    best.update(second, np.array([1]))  # only expert 1 improved
    expected = {k: v.clone() for k, v in first.items()}
    for k, v in expected.items():
        v[1] = second[k][1]
    for k, v in best.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)

    module = torch.nn.Module()
    for k, v in _state(2).items():
        module.register_buffer(k, v)
    best.load_into(module)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    best.close()


def test_the_copy_is_independent_of_later_changes():
    state = _state(0)
    before = {k: v.clone() for k, v in state.items()}
    best = BestWeights(state, spill=True)
    for v in state.values():
        v.add_(1)  # training keeps changing the live weights in place
    for k, v in best.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_large_states_spill_by_default(monkeypatch):
    monkeypatch.setattr(_best_weights, "SPILL_MIN_BYTES", 1)
    assert BestWeights(_state(0)).on_disk
    monkeypatch.setattr(_best_weights, "SPILL_MIN_BYTES", 1 << 40)
    assert not BestWeights(_state(0)).on_disk


def test_unwritable_temp_dir_falls_back_to_memory(monkeypatch, caplog):
    def fail(**kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(_best_weights.tempfile, "TemporaryFile", fail)
    best = BestWeights(_state(0), spill=True)
    assert not best.on_disk
    torch.testing.assert_close(best.state_dict()["w"], _state(0)["w"])


def test_fit_with_spilled_best_weights_equals_in_memory(small_toy, monkeypatch):
    """Same model either way, with one expert's best epoch before the last (validation losses scripted)."""
    import spade_sc.model._trainer as trainer

    scripted = iter([[3.0, 3.0], [2.0, 2.0], [1.0, 1.5], [2.0, 1.2], [3.0, 1.1]] * 3)
    monkeypatch.setattr(trainer, "evaluate_experts", lambda *a, **k: np.array(next(scripted)))
    kw = {"n_prototypes": 4, "n_experts": 2, "proj_dim": 16, "max_epochs": 5, "lr": 3e-2, "random_state": 0}
    fits = {}
    for name, threshold in [("memory", 1 << 40), ("disk", 1), ("memory, last epoch", 1 << 40)]:
        monkeypatch.setattr(_best_weights, "SPILL_MIN_BYTES", threshold)
        if name == "memory, last epoch":  # every epoch improves: the last weights are kept
            falling = iter(np.arange(5.0, 0.0, -1.0))
            monkeypatch.setattr(trainer, "evaluate_experts", lambda *a, f=falling, **k: np.full(2, next(f)))
        fits[name] = ss.tl.fit_spade(
            small_toy.copy(), batch_key="slide", device="cpu", **kw
        ).pairs_.state_dict()
    for k in fits["memory"]:
        torch.testing.assert_close(fits["disk"][k], fits["memory"][k], rtol=0, atol=0)
        # expert 0 kept epoch 2 of 5, expert 1 the last epoch
        assert not torch.equal(fits["memory"][k][0], fits["memory, last epoch"][k][0]), k
        torch.testing.assert_close(fits["memory"][k][1], fits["memory, last epoch"][k][1], rtol=0, atol=0)


def test_no_validation_keeps_no_copy(small_toy, monkeypatch, tmp_path):
    """Without validation spots the last epoch is every expert's best: no copy is made, on disk or in memory,
    with or without checkpoints (which then hold no ``best.*`` tensors), and resuming works."""
    import spade_sc.model._trainer as trainer

    kw = {
        "n_prototypes": 4,
        "n_experts": 2,
        "proj_dim": 16,
        "max_epochs": 3,
        "val_fraction": 0.0,
        "device": "cpu",
    }
    reference = ss.tl.fit_spade(small_toy.copy(), **kw).pairs_.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("BestWeights must not be created without validation spots")

    monkeypatch.setattr(trainer, "BestWeights", refuse)
    for ckpt in (None, tmp_path / "ckpt", tmp_path / "ckpt"):  # the last one resumes the finished fit
        got = ss.tl.fit_spade(small_toy.copy(), checkpoint_dir=ckpt, **kw).pairs_.state_dict()
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
