"""Documentation: every public function documented, plot API conventions, the docs' generated pieces.

The full build is CI's ``sphinx-build -W``; these checks are the fast part of it.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import spade_sc as ss

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _public(mod):
    return [(f"{mod.__name__}.{n}", getattr(mod, n)) for n in mod.__all__ if callable(getattr(mod, n))]


@pytest.mark.parametrize("mod", [ss.pp, ss.tl, ss.pl, ss.io, ss.datasets], ids=lambda m: m.__name__)
def test_every_public_callable_has_a_docstring(mod):
    missing = [name for name, obj in _public(mod) if not (inspect.getdoc(obj) or "").strip()]
    assert not missing, f"public objects without a docstring (the API reference would be empty): {missing}"


def test_spade_model_documented():
    doc = inspect.getdoc(ss.SpadeModel)
    assert "Parameters" in doc and "Attributes" in doc
    for meth in ("fit", "get_embedding", "save", "load"):
        assert inspect.getdoc(getattr(ss.SpadeModel, meth))


@pytest.mark.parametrize("name", ss.pl.__all__)
def test_plot_functions_follow_the_plot_api(name):
    """Each plot takes ``ax=``, has no ``show``/``save`` argument, and documents Parameters/Returns/Examples."""
    fn = getattr(ss.pl, name)
    params = inspect.signature(fn).parameters
    assert "ax" in params and params["ax"].default is None
    assert not {"show", "save", "return_fig"} & set(params)
    doc = inspect.getdoc(fn)
    for section in ("Parameters", "Returns", "Examples"):
        assert re.search(rf"^{section}\n-+$", doc, re.M), f"{name}: no {section} section"
    documented = set(re.findall(r"^(\w[\w, ]*)$", doc.split("Returns")[0], re.M))
    names = {n.strip() for line in documented for n in line.split(",")}
    undocumented = [p for p in params if p not in names and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    assert not undocumented, f"{name}: parameters not in the docstring: {undocumented}"


@pytest.fixture(scope="module")
def conf():
    spec = importlib.util.spec_from_file_location("spade_docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # also copies tutorials/*.ipynb into docs/tutorials (gitignored)
    return module


def test_docs_pages_and_tutorials_exist(conf):
    index = (DOCS / "index.md").read_text()
    for page in ("installation", "method", "api", "cli", "changelog"):
        assert (DOCS / f"{page}.md").is_file()
        assert re.search(rf"^{page}$", index, re.M), f"{page} is not in the index toctree"
    for nb in ("01_quickstart", "02_her2st", "03_hest_at_scale"):
        assert (ROOT / "tutorials" / f"{nb}.ipynb").is_file()
        assert f"tutorials/{nb}" in index
        assert (DOCS / "tutorials" / f"{nb}.ipynb").is_file()  # copied by conf.py for the build
    assert "../CHANGELOG.md" in (DOCS / "changelog.md").read_text()
    assert conf.nb_execution_mode == "off"  # notebooks are rendered with their committed outputs


def test_optional_guide_pages_are_picked_up(conf, tmp_path, monkeypatch):
    """Pages other authors add under docs/ join the toctree when present; missing ones are simply skipped."""
    for name in ("index.md", "api.md", "performance.md", "zzz_extra.md", "benchmarks.md"):
        (tmp_path / name).write_text("# x\n")
    monkeypatch.setattr(conf, "HERE", tmp_path)
    assert conf._guide_pages() == ["benchmarks", "performance", "zzz_extra"]
    source = ["```{toctree}\n<!-- guide-pages -->\n```"]
    conf._fill_placeholders(None, "index", source)
    assert "benchmarks\nperformance\nzzz_extra" in source[0]


def test_cli_help_lists_every_subcommand(conf):
    import argparse

    from spade_sc.cli import build_parser

    text = conf._cli_help()
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in subs:
        assert f"## `spade-sc {name}`" in text
        assert f"usage: spade-sc {name}" in text
