"""Bad input: the right exception type, a message that says what to do, and the caller's data untouched.

Every case snapshots the AnnData (or the SpatialData's tables) with deep copies of ``X``, ``obs``, ``var``,
``obsm``, ``layers`` and ``uns`` before the call and compares them afterwards.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import spade_sc as ss

FIT = {"n_prototypes": 4, "n_experts": 2, "proj_dim": 8, "max_epochs": 1, "batch_size": 64, "device": "cpu"}


# ------------------------------------------------------------------------------------------ snapshots
def _copy(x):
    if sp.issparse(x):
        return x.copy()
    if isinstance(x, pd.DataFrame):
        return x.copy(deep=True)
    return copy.deepcopy(x)


def snapshot(adata: AnnData) -> dict:
    return {
        "shape": adata.shape,
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
        "X": _copy(adata.X),
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obsm": {k: _copy(v) for k, v in adata.obsm.items()},
        "layers": {k: _copy(v) for k, v in adata.layers.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
    }


def _same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif isinstance(a, pd.Index):
        assert a.equals(b), where
    elif sp.issparse(a):
        assert sp.issparse(b) and a.format == b.format and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a.toarray(), b.toarray(), err_msg=where)  # NaN == NaN here
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_unchanged(adata: AnnData, snap: dict) -> None:
    now = snapshot(adata)
    for key in snap:
        _same(snap[key], now[key], f"adata.{key}")


def expect_error(data, call, exc, fix: str):
    """``call(data)`` raises ``exc`` whose message matches ``fix``; ``data`` is unchanged afterwards."""
    tables = dict(data.tables) if hasattr(data, "tables") else {"": data}
    snaps = {k: snapshot(t) for k, t in tables.items()}
    with pytest.raises(exc, match=fix) as info:
        call(data)
    now = dict(data.tables) if hasattr(data, "tables") else {"": data}
    assert now.keys() == tables.keys()
    for k, t in now.items():
        assert_unchanged(t, snaps[k])
    return info


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base_master():
    return ss.datasets.toy(random_state=2, n_slides=2, grid=8)


@pytest.fixture
def adata(base_master):
    return base_master.copy()


@pytest.fixture(scope="module")
def model(base_master):
    return ss.tl.fit_spade(base_master.copy(), **FIT)


@pytest.fixture
def model_dir(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    return path


def _as_float(a):
    a.X = a.X.astype(np.float32)
    return a


# ------------------------------------------------------------------------------------------ features
def test_features_missing_fit(adata):
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, use_rep="X_uni", **FIT), KeyError, "run `ss.pp.extract_features`"
    )


def test_features_missing_embed(adata, model):
    del adata.obsm["X_image"]
    expect_error(adata, lambda a: ss.tl.embed(a, model), KeyError, "run `ss.pp.extract_features`")


def test_nan_features_fit(adata):
    x = adata.obsm["X_image"].copy()
    x[3, 5] = np.nan
    adata.obsm["X_image"] = x
    expect_error(adata, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "drop those spots")


def test_inf_features_embed(adata, model):
    x = adata.obsm["X_image"].copy()
    x[7, 0] = np.inf
    adata.obsm["X_image"] = x
    expect_error(adata, lambda a: ss.tl.embed(a, model), ValueError, "1 spots .*drop those spots")


# ------------------------------------------------------------------------------------------ counts
def test_negative_counts(adata):
    _as_float(adata)
    adata.X.data[:3] = -1.0
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "negative.*pass `layer=` naming raw counts"
    )


def test_non_integer_counts_fit(adata):
    _as_float(adata)
    adata.X.data *= 0.37
    expect_error(adata, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "non-integer.*`normalize=False`")


def test_non_integer_counts_select_genes(adata):
    _as_float(adata)
    adata.X = adata.X.log1p()
    expect_error(adata, lambda a: ss.pp.select_genes(a, batch_key="slide"), ValueError, "layer='counts'")


def test_nan_counts(adata):
    _as_float(adata)
    adata.X.data[0] = np.nan
    expect_error(adata, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "NaN.*clean the expression")


def test_non_integer_counts_expression_embedding(adata, model):
    _as_float(adata)
    adata.X.data *= 0.5
    expect_error(
        adata,
        lambda a: ss.tl.embed(a, model, modality="expression"),
        ValueError,
        "pass `layer=` naming raw counts",
    )


# ------------------------------------------------------------------------------------------ empty data
def test_no_spots(adata):
    empty = adata[:0].copy()
    expect_error(empty, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "pass a non-empty AnnData")
    expect_error(empty, lambda a: ss.pp.select_genes(a), ValueError, "pass a non-empty AnnData")


def test_no_genes(adata):
    nogenes = adata[:, :0].copy()
    expect_error(nogenes, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "no genes.*pass an AnnData")


def test_gene_mask_selects_nothing(adata):
    adata.var["spade_gene"] = False
    expect_error(adata, lambda a: ss.tl.fit_spade(a, **FIT), ValueError, "rerun `ss.pp.select_genes`")


def test_not_anndata(model):
    x = np.zeros((4, 4))
    with pytest.raises(TypeError, match="AnnData or SpatialData"):
        ss.tl.fit_spade(x, **FIT)
    with pytest.raises(TypeError, match="AnnData or SpatialData"):
        ss.tl.embed(x, model)
    np.testing.assert_array_equal(x, 0)


# ------------------------------------------------------------------------------------------ clustering sizes
def test_expert_with_too_few_spots(adata):
    x = adata.obsm["X_image"].copy()
    x[-1] += 1e3  # one far outlier becomes a prototype, and an expert, of its own
    adata.obsm["X_image"] = x
    expect_error(
        adata,
        lambda a: ss.tl.fit_spade(a, **(FIT | {"n_prototypes": 2, "val_fraction": 0.0})),
        ValueError,
        r"expert\(s\) \{1: 1\}.*lower `n_experts`",
    )


def test_group_with_too_few_spots(adata):
    adata.obs["organ"] = pd.Categorical(["A"] * (adata.n_obs - 1) + ["B"])
    # group B's single spot gives one prototype, not 3: together 4 prototypes for 5 experts
    with pytest.warns(UserWarning, match="group .*B.* has only 1 distinct"):
        expect_error(
            adata,
            lambda a: ss.tl.fit_spade(
                a, group_key="organ", **(FIT | {"n_prototypes": 3, "n_experts": 5, "val_fraction": 0.0})
            ),
            ValueError,
            "lower `n_experts` to ≤ 4",
        )


def test_more_prototypes_than_spots(adata):
    few = adata[:10].copy()
    expect_error(
        few, lambda a: ss.tl.fit_spade(a, **(FIT | {"n_prototypes": 20})), ValueError, "lower `n_prototypes`"
    )


def test_more_experts_than_prototypes(adata):
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, **(FIT | {"n_experts": 5})), ValueError, "lower `n_experts`"
    )


# ------------------------------------------------------------------------------------------ unknown keys
def test_unknown_batch_key(adata):
    info = expect_error(
        adata, lambda a: ss.tl.fit_spade(a, batch_key="sample", **FIT), KeyError, "pass one of"
    )
    assert "'slide'" in str(info.value)
    expect_error(adata, lambda a: ss.pp.select_genes(a, batch_key="sample"), KeyError, "pass one of")


def test_unknown_group_key(adata):
    expect_error(
        adata,
        lambda a: ss.tl.fit_spade(a, group_key="organ", **FIT),
        KeyError,
        "`group_key='organ'`.*pass one of",
    )


def test_missing_batch_values(adata):
    s = adata.obs["slide"].astype(object)
    s.iloc[0] = None
    adata.obs["slide"] = s
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, batch_key="slide", **FIT), ValueError, "fill or drop them"
    )


def test_unknown_layer(adata):
    expect_error(adata, lambda a: ss.tl.fit_spade(a, layer="raw", **FIT), KeyError, "`layer=None` for `.X`")
    expect_error(adata, lambda a: ss.pp.select_genes(a, layer="raw"), KeyError, "pass one of its layers")


def test_unknown_use_rep_embed(adata, model):
    expect_error(adata, lambda a: ss.tl.embed(a, model, use_rep="X_uni"), KeyError, "pass `use_rep=`")


def test_unknown_table_key_spatialdata(adata, model):
    from spatialdata import SpatialData

    sdata = SpatialData(tables={"spots": adata, "other": adata.copy()})
    expect_error(sdata, lambda s: ss.tl.fit_spade(s, table_key="table", **FIT), KeyError, "not a table")
    expect_error(sdata, lambda s: ss.tl.embed(s, model), ValueError, "pass `table_key=`")
    expect_error(sdata, lambda s: ss.pp.select_genes(s, table_key="table"), KeyError, "not a table")


# ------------------------------------------------------------------------------------------ model mismatch
def test_feature_dim_differs_from_model(adata, model):
    adata.obsm["X_image"] = adata.obsm["X_image"][:, :32].copy()
    expect_error(adata, lambda a: ss.tl.embed(a, model), ValueError, "32.*64-d.*same encoder")


def test_gene_panel_differs_from_model(adata, model):
    other = adata[:, 10:].copy()
    expect_error(
        other,
        lambda a: ss.tl.embed(a, model, modality="expression"),
        ValueError,
        "10 of the model's 300 genes.*genes_",
    )


def test_model_not_a_model(adata):
    expect_error(adata, lambda a: ss.tl.embed(a, "model.safetensors"), TypeError, "SpadeModel.load")
    expect_error(adata, lambda a: ss.tl.embed(a, ss.SpadeModel()), RuntimeError, "call `ss.tl.fit_spade`")


# ------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("tau", [0, -0.1, float("nan")])
def test_non_positive_tau(adata, model, tau):
    expect_error(adata, lambda a: ss.tl.embed(a, model, tau=tau), ValueError, "`tau` must be > 0")


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_non_positive_temperature(adata, temperature):
    expect_error(
        adata,
        lambda a: ss.tl.fit_spade(a, **(FIT | {"temperature": temperature})),
        ValueError,
        "`temperature` must be > 0",
    )


def test_bad_hyperparameters(adata):
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, **(FIT | {"val_fraction": 1.0})), ValueError, r"in \[0, 1\)"
    )
    expect_error(
        adata, lambda a: ss.tl.fit_spade(a, **(FIT | {"random_state": "0"})), TypeError, "integer or None"
    )
    with pytest.raises(TypeError, match="known:"):
        ss.SpadeModel(n_protoypes=4)


def test_negative_routing_eps(adata, model):
    expect_error(
        adata, lambda a: ss.tl.embed(a, model, routing_eps=-0.1), ValueError, "`routing_eps` must be ≥ 0"
    )


# ------------------------------------------------------------------------------------------ images
PATCH = {"patch_size": 16, "mpp": 2.0}


def test_spots_outside_the_image(adata):
    adata.obsm["spatial"] = adata.obsm["spatial"] + 5000.0
    expect_error(adata, lambda a: ss.pp.extract_patches(a, edge="raise", **PATCH), ValueError, "edge='mask'")
    expect_error(
        adata,
        lambda a: ss.pp.extract_features(
            a, model=lambda b: b.reshape(len(b), -1)[:, :4].astype(float), edge="raise", **PATCH
        ),
        ValueError,
        "drop those spots",
    )


@pytest.mark.parametrize("source_mpp", [0, -0.5])
def test_non_positive_pixel_size(adata, source_mpp):
    expect_error(adata, lambda a: ss.pp.extract_patches(a, source_mpp=source_mpp, **PATCH), ValueError, "> 0")
    expect_error(adata, lambda a: ss.pp.extract_patches(a, patch_size=16, mpp=source_mpp), ValueError, "> 0")


def test_unknown_pixel_size(adata):
    for lib in adata.uns["spatial"]:
        del adata.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"]
    expect_error(adata, lambda a: ss.pp.extract_patches(a, **PATCH), ValueError, "pass `source_mpp=`")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_corrupt_recorded_pixel_size(adata, bad):
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"] = bad
    expect_error(adata, lambda a: ss.pp.extract_patches(a, **PATCH), ValueError, "microns_per_pixel")


def test_unknown_encoder(adata):
    expect_error(
        adata, lambda a: ss.pp.extract_features(a, model="uni3", **PATCH), ValueError, "choose one of"
    )


# ------------------------------------------------------------------------------------------ model directories
def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass the directory given to `model.save`"):
        ss.SpadeModel.load(tmp_path / "nothing")


def test_load_incomplete_directory(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete spade_sc model directory"):
        ss.SpadeModel.load(model_dir)


def test_load_corrupt_config(model_dir):
    (model_dir / "config.json").write_text('{"format": "spade_sc.SpadeModel", "format_vers')
    with pytest.raises(ValueError, match="not valid JSON.*corrupt"):
        ss.SpadeModel.load(model_dir)


def test_load_config_missing_entries(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["genes"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lacks \['genes'\].*save the model again"):
        ss.SpadeModel.load(model_dir)


def test_load_truncated_weights(model_dir):
    w = model_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="could not be read.*corrupt"):
        ss.SpadeModel.load(model_dir)


def test_load_weights_not_matching_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["feature_dim"] = 7
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        ss.SpadeModel.load(model_dir)


def test_load_newer_format_version(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["format_version"] = ss.model.FORMAT_VERSION + 1
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer.*pip install -U spade_sc"):
        ss.SpadeModel.load(model_dir)


def test_save_over_existing_directory(model, model_dir, tmp_path):
    before = _files(model_dir)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(model_dir)
    assert _files(model_dir) == before
    # a directory holding something else is not clobbered either
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(other)
    assert _files(other) == {"notes.txt": b"keep me"}
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        model.save(f)
    # and overwrite=True does replace the model
    model.save(model_dir, overwrite=True)
    assert sorted(_files(model_dir)) == ["config.json", "model.safetensors"]
    shutil.rmtree(model_dir)
