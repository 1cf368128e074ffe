"""The quickstart notebook runs top to bottom (executed with nbclient in a temporary directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def _execute(path: Path, cwd: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    env_backup = dict(os.environ)
    os.environ.update({"MPLBACKEND": "module://matplotlib_inline.backend_inline", "HF_HUB_OFFLINE": "1"})
    try:
        client = nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out.append(str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_quickstart_runs(tmp_path):
    nb = _execute(TUTORIALS / "01_quickstart.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = _text(nb)
    assert "identical embeddings: True" in text
    assert "ARI (experts vs domains)" in text
    images = sum(
        1 for c in nb.cells for o in c.get("outputs", []) if {"image/png", "image/jpeg"} & set(o.get("data", {}))
    )
    assert images >= 8  # H&E, elbow, training curves, expert maps ×2, expert genes, UMAP, gene maps
    assert list(tmp_path.iterdir()) == []  # the notebook writes nothing into its working directory


def test_committed_notebooks_are_executed():
    """Every tutorial is committed with its outputs: each code cell ran, in order, without errors."""
    nbformat = pytest.importorskip("nbformat")
    paths = sorted(TUTORIALS.glob("*.ipynb"))
    assert [p.name for p in paths][:1] == ["01_quickstart.ipynb"]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
        counts = [c.execution_count for c in code]
        assert all(n is not None for n in counts), f"{path.name}: not executed"
        assert counts == sorted(counts), f"{path.name}: cells executed out of order"
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: committed with an error output"
