import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from spade_sc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()]
    install, test, demo = commands[:3]
    assert "pip install -e \".[test]\"" in install and "venv" in install
    assert install in ci and test in ci
    assert demo.split(" --out")[0] in ci


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip()


def test_fit_and_embed_commands(small_toy, tmp_path):
    src = tmp_path / "in.h5ad"
    small_toy.write_h5ad(src)
    rc = main([
        "fit", str(src), "--model", str(tmp_path / "m"), "--output", str(tmp_path / "fit.h5ad"),
        "--batch-key", "slide", "--select-genes", "--n-prototypes", "4", "--n-experts", "2", "--epochs", "2", "-q",
    ])
    assert rc == 0
    fitted = ad.read_h5ad(tmp_path / "fit.h5ad")
    assert fitted.obsm["X_spade"].shape == (small_toy.n_obs, 256)
    rc = main(["embed", str(src), "--model", str(tmp_path / "m"), "--output", str(tmp_path / "e.h5ad"), "-q"])
    assert rc == 0
    embedded = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(embedded.obsm["X_spade"], fitted.obsm["X_spade"], atol=1e-6)
    # a second fit into the same model directory is refused without --overwrite, with a clear message
    rc = main(["fit", str(src), "--model", str(tmp_path / "m"), "--n-prototypes", "4", "--n-experts", "2",
               "--epochs", "1", "-q"])
    assert rc == 1


def test_cli_error_is_clean(tmp_path, capsys):
    rc = main(["embed", str(tmp_path / "missing.h5ad"), "--model", str(tmp_path), "--output", str(tmp_path / "o")])
    assert rc == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "spade_sc.cli", "demo", "--out", str(out), "--epochs", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ARI" in proc.stdout
    for name in ("toy_spade.h5ad", "experts.png", "model/config.json", "model/model.safetensors"):
        assert (out / name).stat().st_size > 0
    adata = ad.read_h5ad(out / "toy_spade.h5ad")
    assert {"X_spade", "spade_expert_weights"} <= set(adata.obsm)
