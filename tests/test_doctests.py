"""Every ``>>>`` example in spade_sc's docstrings runs and shows what it says (doctest, one test per module).

Progress bars are silenced by conftest's autouse ``_quiet_progress`` fixture; plots use the Agg backend and
every figure is closed afterwards; the examples run with the working directory in ``tmp_path``, so anything
they write with a relative path lands there.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

import spade_sc as ss

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    return Path(spec.origin).read_text(encoding="utf-8")


def _raise(name: str) -> None:
    raise ImportError(f"cannot import {name} while looking for docstring examples")


def _modules_with_examples() -> list[str]:
    """spade_sc and its submodules whose source contains a ``>>>`` example."""
    names = [ss.__name__] + [
        info.name for info in pkgutil.walk_packages(ss.__path__, prefix=f"{ss.__name__}.", onerror=_raise)
    ]
    return sorted(name for name in names if ">>>" in _source(name))


MODULES = _modules_with_examples()


def test_modules_are_discovered():
    """The walk finds the modules known to have examples (so the parametrization below is not empty)."""
    assert {"spade_sc.tl._fit", "spade_sc.model._spade_model", "spade_sc.pl._experts"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    failed = attempted = 0
    try:
        for test in finder.find(module, name):
            result = runner.run(test, out=report.append)
            failed += result.failed
            attempted += result.attempted
    finally:
        plt.close("all")
    assert attempted > 0, f"{name} contains '>>>' but doctest found no examples to run"
    assert failed == 0, f"{failed} of {attempted} examples in {name} failed:\n" + "".join(report)
