"""``tl.few_shot``: separable labels are learned, shuffled labels stay at chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spade_sc as ss


def _blobs(n_per_class=40, n_classes=3, dim=8, sep=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * sep
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    a = AnnData(
        X=np.zeros((len(labels), 1), np.float32),
        obs=pd.DataFrame({"label": [f"c{i}" for i in labels]}, index=[f"s{i}" for i in range(len(labels))]),
    )
    a.obsm["X_emb"] = x.astype(np.float32)
    return a


def test_separable_labels_reach_high_accuracy():
    a = _blobs()
    res = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(1, 4, 16), n_repeats=5)
    assert list(res["shots"]) == [1, 4, 16]
    assert list(res["n_train"]) == [3, 12, 48]
    assert list(res["n_test"]) == [117, 108, 72]
    assert (res["balanced_accuracy_mean"] >= 0.95).all()
    assert (res["auc_mean"] >= 0.99).all()
    assert (res["n_repeats"] == 5).all()


def test_shuffled_labels_stay_at_chance():
    a = _blobs(n_per_class=60, n_classes=2, seed=1)
    a.obs["label"] = np.random.default_rng(0).permutation(a.obs["label"].to_numpy())
    res = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(1, 8), n_repeats=30)
    assert np.all(np.abs(res["balanced_accuracy_mean"] - 0.5) < 0.08)
    assert np.all(np.abs(res["auc_mean"] - 0.5) < 0.08)


def test_repeats_match_summary_and_are_reproducible():
    a = _blobs(sep=1.0)
    per = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(2,), n_repeats=4, return_repeats=True)
    again = ss.tl.few_shot(
        a, label_key="label", use_rep="X_emb", shots=(2,), n_repeats=4, return_repeats=True
    )
    pd.testing.assert_frame_equal(per, again)
    summ = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(2,), n_repeats=4)
    assert summ["balanced_accuracy_mean"].iloc[0] == pytest.approx(per["balanced_accuracy"].mean())
    assert summ["auc_sd"].iloc[0] == pytest.approx(per["auc"].std(ddof=0))
    other = ss.tl.few_shot(
        a, label_key="label", use_rep="X_emb", shots=(2,), n_repeats=4, random_state=5, return_repeats=True
    )
    assert not np.allclose(other["balanced_accuracy"], per["balanced_accuracy"])


def test_default_C_is_tangle_value():
    """C = 2 · dim / 100: the same numbers as an explicit C."""
    a = _blobs(sep=1.0, dim=8)
    kw = {"label_key": "label", "use_rep": "X_emb", "shots": (4,), "n_repeats": 3, "return_repeats": True}
    default = ss.tl.few_shot(a, **kw)
    explicit = ss.tl.few_shot(a, C=2 * 8 / 100, **kw)
    other = ss.tl.few_shot(a, C=100.0, **kw)
    pd.testing.assert_frame_equal(default, explicit)
    assert not np.allclose(default["auc"], other["auc"])


def test_slide_level_pooling():
    rng = np.random.default_rng(3)
    n_slides, spots = 12, 20
    slide_label = np.array(["pos", "neg"] * (n_slides // 2))
    rows, feats = [], []
    for s in range(n_slides):
        shift = 3.0 if slide_label[s] == "pos" else -3.0
        feats.append(rng.normal(size=(spots, 4)) + shift)
        rows += [{"slide": f"sl{s}", "label": slide_label[s]}] * spots
    a = AnnData(
        X=np.zeros((n_slides * spots, 1), np.float32),
        obs=pd.DataFrame(rows, index=[f"s{i}" for i in range(len(rows))]),
    )
    a.obsm["X_emb"] = np.concatenate(feats).astype(np.float32)
    res = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", pool_key="slide", shots=(1, 2), n_repeats=5)
    assert list(res["n_train"] + res["n_test"]) == [n_slides, n_slides]  # slides, not spots
    assert (res["balanced_accuracy_mean"] == 1.0).all()
    bad = a.copy()
    bad.obs.loc[bad.obs.index[0], "label"] = "neg"  # slide sl0 now has two labels
    with pytest.raises(ValueError, match="one label per"):
        ss.tl.few_shot(bad, label_key="label", use_rep="X_emb", pool_key="slide")


def test_too_large_shots_skipped_with_warning_and_errors():
    a = _blobs(n_per_class=5)
    with pytest.warns(UserWarning, match=r"skipping shots \[8, 16\]"):
        res = ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(1, 4, 8, 16), n_repeats=2)
    assert list(res["shots"]) == [1, 4]
    with pytest.raises(ValueError, match="no `shots` value"), pytest.warns(UserWarning):
        ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(5,))
    one = a[a.obs["label"] == "c0"].copy()
    with pytest.raises(ValueError, match="only one class"):
        ss.tl.few_shot(one, label_key="label", use_rep="X_emb")
    with pytest.raises(KeyError, match="label_key"):
        ss.tl.few_shot(a, label_key="nope", use_rep="X_emb")
    with pytest.raises(KeyError, match="X_nope"):
        ss.tl.few_shot(a, label_key="label", use_rep="X_nope")
    with pytest.raises(ValueError, match="shots"):
        ss.tl.few_shot(a, label_key="label", use_rep="X_emb", shots=(0,))


def test_on_toy_domains_writes_nothing(toy):
    before = toy.copy()
    res = ss.tl.few_shot(toy, label_key="domain", use_rep="X_image", shots=(4,), n_repeats=2)
    assert res["balanced_accuracy_mean"].iloc[0] > 0.5  # 5 domains: chance is 0.2
    assert list(toy.obs.columns) == list(before.obs.columns) and list(toy.uns) == list(before.uns)
