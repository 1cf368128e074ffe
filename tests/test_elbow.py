"""``tl.elbow`` (and its plot ``pl.elbow``): WCSS curves of both clustering stages."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.cluster import KMeans

import spade_sc as ss
from spade_sc.tl._elbow import knee


@pytest.fixture
def blobs():
    """Two groups of 4 well separated Gaussian blobs each (so the stage-1 elbow is at k = 4)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 5))
    x = np.concatenate([centres[i % 4] + rng.normal(0, 0.3, (40, 5)) for i in range(8)])
    obs = {"group": np.repeat(["a", "b"], 160)}
    adata = ad.AnnData(np.zeros((320, 3), dtype=np.float32), obs=obs)
    adata.obsm["X_image"] = x.astype(np.float32)
    return adata


def test_knee_known_answers():
    ks = [1, 2, 4, 8, 16]
    assert knee(ks, [100, 50, 5, 4, 3]) == 4  # sharp drop until 4, flat after
    assert knee(ks, [100, 10, 9, 8, 7]) == 2
    assert knee([2, 4], [3, 1]) == -1  # too few points
    assert knee(ks, [1, 1, 1, 1, 1]) == -1  # flat
    assert knee(ks, [100, 75, 50, 25, 0]) == -1  # straight on the log-k scale: no elbow
    assert knee(ks, [100, 99, 98, 90, 0]) == -1  # concave: no elbow


def test_stage1_matches_sklearn_and_knee(blobs):
    ss.tl.elbow(blobs, ks=(2, 4, 8, 16), group_key="group", n_prototypes=4, random_state=0)
    res = blobs.uns["spade_elbow"]
    assert list(res["groups"]) == ["a", "b"]
    assert res["stage1_wcss"].shape == (2, 4)
    # independent: sklearn inertia on group a at k=4
    xa = blobs.obsm["X_image"][:160]
    inertia = KMeans(4, n_init="auto", random_state=0).fit(xa).inertia_
    assert res["stage1_wcss"][0, 1] == pytest.approx(inertia, rel=1e-4)
    tss = ((xa.astype(float) - xa.mean(0)) ** 2).sum()
    assert res["stage1_tss"][0] == pytest.approx(tss, rel=1e-5)
    assert np.all(np.diff(res["stage1_wcss"], axis=1) <= 1e-6)  # WCSS decreases with k
    assert list(res["stage1_knee"]) == [4, 4]
    assert list(res["stage1_n_spots"]) == [160, 160]
    # stage 2 clusters the 2 × 4 centroids: default ks are those ≤ 8
    assert list(res["stage2_ks"]) == [2, 4, 8]
    assert res["stage2_wcss"][-1] == pytest.approx(0.0, abs=1e-6)  # one cluster per centroid
    assert res["stage2_knee"] == 4  # the two groups share the same 4 blobs


def test_nan_when_group_too_small_and_h5ad_roundtrip(blobs, tmp_path):
    small = blobs[np.r_[0:160, 160:166]].copy()  # group b has 6 spots
    with pytest.warns(UserWarning, match="distinct spots"):
        ss.tl.elbow(small, ks=(2, 4, 8), group_key="group", n_prototypes=8)
    res = small.uns["spade_elbow"]
    assert np.isnan(res["stage1_wcss"][1, 2]) and np.isfinite(res["stage1_wcss"][1, :2]).all()
    small.write_h5ad(tmp_path / "e.h5ad")
    back = ad.read_h5ad(tmp_path / "e.h5ad").uns["spade_elbow"]
    np.testing.assert_array_equal(back["ks"], res["ks"])
    np.testing.assert_allclose(back["stage1_wcss"], res["stage1_wcss"])
    assert list(back["groups"]) == ["a", "b"]
    fig = ss.pl.elbow(back)  # the plot works from the read-back dict too
    assert len(fig.axes) == 2
    plt.close("all")


def test_subsample_copy_and_defaults(blobs):
    blobs.uns["spade"] = {"params": {"n_prototypes": 2, "n_experts": 2}}
    out = ss.tl.elbow(blobs, ks=(2, 4), max_spots_per_group=50, copy=True)
    assert "spade_elbow" not in blobs.uns
    res = out.uns["spade_elbow"]
    assert res["n_prototypes"] == 2  # taken from the previous fit's params
    assert list(res["stage1_n_spots"]) == [50]
    assert list(res["groups"]) == ["all"]
    assert list(res["stage2_ks"]) == [2]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"ks": (8, 4)}, ValueError, "increasing"),
        ({"ks": ()}, ValueError, "non-empty"),
        ({"ks": (0, 2)}, ValueError, "≥ 1"),
        ({"use_rep": "nope"}, KeyError, "extract_features"),
        ({"group_key": "nope"}, KeyError, "group_key"),
        ({"stage2_ks": (2, 64), "n_prototypes": 4}, ValueError, "stage2_ks"),
        ({"backend": "torch"}, ValueError, "backend"),
    ],
)
def test_bad_input_leaves_data_untouched(blobs, kwargs, err, match):
    before = set(blobs.uns)
    with pytest.raises(err, match=match):
        ss.tl.elbow(blobs, **kwargs)
    assert set(blobs.uns) == before


def test_spatialdata_table(blobs):
    from spatialdata import SpatialData

    sdata = SpatialData(tables={"table": blobs})
    ss.tl.elbow(sdata, ks=(2, 4, 8), table_key="table", n_prototypes=4)
    assert "spade_elbow" in sdata.tables["table"].uns


def test_pl_elbow_content(blobs, tmp_path):
    blobs.uns["spade"] = {"params": {"n_prototypes": 4, "n_experts": 4}}
    ss.tl.elbow(blobs, ks=(2, 4, 8, 16), group_key="group")
    fig = ss.pl.elbow(blobs)
    fig.savefig(tmp_path / "elbow.png", dpi=60)
    assert (tmp_path / "elbow.png").stat().st_size > 0
    ax1, ax2 = fig.axes[:2]
    res = blobs.uns["spade_elbow"]
    # stage 1: one curve per group, normalised by the total sum of squares; knee circles; chosen k line
    curves = [ln for ln in ax1.get_lines() if not ln.get_label().startswith("_")]
    assert [c.get_label() for c in curves] == ["a", "b"]
    np.testing.assert_allclose(curves[0].get_ydata(), res["stage1_wcss"][0] / res["stage1_tss"][0])
    knees = [ln for ln in ax1.get_lines() if ln.get_label() == "_knee"]
    assert [ln.get_xdata()[0] for ln in knees] == [4, 4]
    chosen = [ln for ln in ax1.get_lines() if ln.get_label() == "_chosen"]
    assert chosen and chosen[0].get_xdata()[0] == 4
    assert ax1.get_xscale() == "log"
    assert [t.get_text() for t in ax1.get_xticklabels()] == ["2", "4", "8", "16"]
    # stage 2: one curve, k marked from the fit params
    assert len([ln for ln in ax2.get_lines() if not ln.get_label().startswith("_")]) == 1
    assert [ln.get_xdata()[0] for ln in ax2.get_lines() if ln.get_label() == "_chosen"] == [4]
    # a single stage returns its Axes; raw WCSS when normalize=False
    a = ss.pl.elbow(blobs, stage=2, normalize=False)
    np.testing.assert_allclose(a.get_lines()[0].get_ydata(), res["stage2_wcss"])
    with pytest.raises(ValueError, match="stage"):
        ss.pl.elbow(blobs, stage=3)
    with pytest.raises(KeyError, match="tl.elbow"):
        ss.pl.elbow(ad.AnnData(np.zeros((2, 2))))
    plt.close("all")
