"""``pl.training_curves``: one train and one validation line per expert, best epoch marked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

import spade_sc as ss
from spade_sc.pl._spatial import default_palette


@pytest.fixture
def history():
    """3 experts, 5 epochs; expert 2 has no validation spots."""
    rows = []
    for e in range(3):
        for ep in range(5):
            val = np.nan if e == 2 else [5, 4, 3.5, 3.7, 3.9][ep] + e
            rows.append({"epoch": ep, "expert": e, "train_loss": 10.0 / (ep + 1) + e, "val_loss": val})
    return pd.DataFrame(rows)


def test_lines_per_expert(history, tmp_path):
    ax = ss.pl.training_curves(history)
    ax.figure.savefig(tmp_path / "curves.png", dpi=50)
    lines = ax.get_lines()
    train = [ln for ln in lines if ln.get_linestyle() == "-" and not ln.get_label().startswith("_")]
    val = [ln for ln in lines if ln.get_linestyle() == "--"]
    best = [ln for ln in lines if ln.get_label() == "_best"]
    assert [ln.get_label() for ln in train] == ["expert 0", "expert 1", "expert 2"]
    assert len(val) == 2 and len(best) == 2  # expert 2 has no validation
    np.testing.assert_allclose(train[1].get_ydata(), history.query("expert == 1")["train_loss"])
    # best epoch = lowest validation loss (epoch 2 of [5, 4, 3.5, 3.7, 3.9])
    assert [ln.get_xdata()[0] for ln in best] == [2, 2]
    # colours are the experts' colours of pl.experts
    for e, ln in enumerate(train):
        assert to_rgba(ln.get_color()) == to_rgba(default_palette(3)[e])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["expert 0", "expert 1", "expert 2", "train", "validation", "best (kept)"]
    plt.close("all")


def test_separate_panels_and_subset(history):
    fig = ss.pl.training_curves(history, separate=True, logy=True)
    visible = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in visible] == ["expert 0", "expert 1", "expert 2"]
    assert all(a.get_yscale() == "log" for a in visible)
    assert len(visible[2].get_lines()) == 1  # train only
    ax = ss.pl.training_curves(history, experts=[1])
    assert len(ax.get_lines()) == 3  # train, validation, best
    # given one Axes, the panels take its place in the same figure
    f, a = plt.subplots()
    out = ss.pl.training_curves(history, separate=True, ax=a)
    assert out is f and len([x for x in f.axes if x.get_visible()]) == 3
    plt.close("all")


def test_errors(history):
    with pytest.raises(ValueError, match="not in the history"):
        ss.pl.training_curves(history, experts=[7])
    with pytest.raises(ValueError, match="no training history"):
        ss.pl.training_curves(ss.SpadeModel())
    with pytest.raises(KeyError, match="columns"):
        ss.pl.training_curves(history.drop(columns="val_loss"))


def test_fitted_model(small_toy):
    model = ss.tl.fit_spade(small_toy, batch_key="slide", n_prototypes=4, n_experts=3, max_epochs=3, proj_dim=16)
    ax = ss.pl.training_curves(model)
    train = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and not ln.get_label().startswith("_")]
    assert len(train) == model.n_experts_
    assert all(len(ln.get_xdata()) == 3 for ln in train)
    plt.close("all")
