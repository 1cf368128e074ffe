"""Sphinx configuration of the spade_sc documentation.

Build (warnings are errors): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Notebooks under ``tutorials/`` are rendered with the outputs committed in them: myst-nb never executes them.
"""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import spade_sc  # noqa: E402

project = "spade_sc"
author = "spade_sc developers"
copyright = f"{date.today().year}, {author}"  # noqa: A001
release = spade_sc.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]

# ---------------------------------------------------------------------------------------------- sources
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary stubs
master_doc = "index"
exclude_patterns = ["_build", "_scripts", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store", "tutorials/*_files",
                    "tutorials/**/*.md", "tutorials/README*"]
templates_path = ["_templates"]
html_static_path = ["_static"]

# myst / myst-nb: notebooks are executed separately and committed with their outputs
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove-warn"

# autodoc / autosummary / napoleon (numpydoc-style docstrings)
autosummary_generate = True
autosummary_imported_members = True
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_mock_imports: list[str] = []
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True
# "Returns" in this code base is free text (what is returned and every key written), not "type: description":
# render it as written, like scanpydoc does for scanpy.
napoleon_custom_sections = [("Returns", "returns_as_written")]
typehints_defaults = "comma"
typehints_use_rtype = False
always_document_param_types = False
typehints_document_rtype = False
suppress_warnings = ["sphinx_autodoc_typehints", "myst.header", "config.cache"]

# ---------------------------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = "spade_sc"
html_theme_options = {
    "repository_url": "https://github.com/spade-sc/spade_sc",
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_show_sourcelink = False

# ---------------------------------------------------------------------------------------------- generated pieces
# Pages other engineers add under docs/ join the "User guide" toctree when they exist (in this order first);
# any other top-level page not listed anywhere is appended, so no page is orphaned and none is required.
GUIDE_ORDER = ["io_and_features", "benchmarks", "performance", "reliability"]
CORE_PAGES = {"index", "installation", "method", "api", "cli", "changelog", "tutorials"}


def _copy_tutorials() -> None:
    """Copy ``tutorials/*.ipynb`` (the notebooks, executed and committed there) into ``docs/tutorials/``.

    Sphinx only reads documents under its source directory; a copy (not a symlink, which MyST resolves to the
    real path outside the source tree) keeps the notebooks' relative links working.
    """
    import shutil

    dest = HERE / "tutorials"
    if dest.is_symlink():
        dest.unlink()
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.ipynb"):
        if not (ROOT / "tutorials" / old.name).exists():
            old.unlink()
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        shutil.copy2(nb, dest / nb.name)


_copy_tutorials()


def _guide_pages() -> list[str]:
    present = {p.stem for p in HERE.glob("*.md")} | {p.stem for p in HERE.glob("*.rst")}
    extra = sorted(present - CORE_PAGES - set(GUIDE_ORDER))
    return [p for p in GUIDE_ORDER if p in present] + extra


def _cli_help() -> str:
    """Markdown sections with the ``--help`` of ``spade-sc`` and of each of its sub-commands."""
    import argparse

    from spade_sc.cli import build_parser

    parser = build_parser()
    parser.prog = "spade-sc"
    out = ["## `spade-sc --help`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [f"## `spade-sc {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _fill_placeholders(app, docname, source):
    text = source[0]
    if "<!-- guide-pages -->" in text:
        text = text.replace("<!-- guide-pages -->", "\n".join(_guide_pages()))
    if "<!-- cli-help -->" in text:
        text = text.replace("<!-- cli-help -->", _cli_help())
    source[0] = text


def setup(app):
    app.connect("source-read", _fill_placeholders)
