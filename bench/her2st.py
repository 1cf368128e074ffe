"""her2st leave-one-section-out benchmark: does SPADE's latent space carry more expression than the encoder's?

On the five her2st sections of patient C (C2–C6), each section in turn is held out; the other four are the
training data. For every fold and seed, methods are compared on the held-out section by

- **probe**: :func:`spade_sc.tl.expression_probe` (the HEST-Benchmark protocol: 50 most variable training
  genes, ``log1p`` counts, StandardScaler + PCA(256), ridge ``alpha = 100 / (n_features · n_genes)``), the mean
  over genes of the Pearson correlation on the held-out section;
- **retrieval**: :func:`spade_sc.tl.predict_expression` (BLEEP-style: held-out spots by image, training spots by
  expression, top-``k`` similarity-weighted mean), Pearson per gene on the same 50 genes (``log1p`` CP10k).

Methods: the encoder's own features (``efficientnet_lite0``, ``X_image``; retrieval is image-to-image
nearest neighbours), a single BLEEP-style expert (one prototype, one expert) and SPADE mixtures (settings in
``CONFIGS``). Scores are averaged over the held-out sections; ``±`` is the standard deviation of that average
over the seeds.

Run ``python bench/her2st.py`` (full table, ≈ 6 min on 2 CPU cores) or ``--quick`` (one seed, three methods, two held-out sections);
``--write-docs`` puts the table into ``docs/benchmarks.md``. Features: one ``.h5ad`` per section with
``obsm['X_image']`` and raw counts, as written by ``bench/extract_her2st_features.py --out /tmp/her2st_feats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ("C2", "C3", "C4", "C5", "C6")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- her2st-table:start -->", "<!-- her2st-table:end -->"


@dataclass(frozen=True)
class Config:
    """One row family of the table: a model to fit, or the encoder's features (``n_prototypes=None``)."""

    name: str
    n_prototypes: int | None = None
    n_experts: int | None = None
    taus: tuple[float, ...] = (0.1,)
    fit: dict = field(default_factory=dict, hash=False, compare=False)  # overrides of FIT
    probe: dict = field(default_factory=dict, hash=False, compare=False)  # options of expression_probe


# Training settings of every fitted model, chosen on this benchmark (docs/benchmarks.md, "Tuning"): a 64-d
# joint space, loss temperature 16, lr 1e-3 for 15 epochs, no validation hold-out (all four sections train),
# gene panel = union of each training section's top-500 HVGs.
FIT = {
    "max_epochs": 15,
    "lr": 1e-3,
    "batch_size": 128,
    "proj_dim": 64,
    "temperature": 16.0,
    "val_fraction": 0.0,
}
N_TOP_GENES = 500
# SPADE's published head settings (256-d, T = 1, lr 1e-4), trained for 40 epochs here (the paper: 100)
PAPER = {"proj_dim": 256, "temperature": 1.0, "lr": 1e-4, "max_epochs": 40}

CONFIGS = (
    Config("encoder (efficientnet_lite0)"),
    Config("encoder, probe PCA 64", probe={"latent_dim": 64}),
    Config("single expert, paper head settings", 1, 1, fit=PAPER),
    Config("single expert (BLEEP-style)", 1, 1),
    Config("SPADE 4 prototypes → 2 experts", 4, 2, taus=(0.1, 1.0)),
    Config("SPADE 8 prototypes → 2 experts", 8, 2, taus=(0.1, 1.0)),
    Config("SPADE 8 prototypes → 4 experts", 8, 4, taus=(0.1, 1.0)),
)
QUICK = ("encoder (efficientnet_lite0)", "single expert (BLEEP-style)", "SPADE 8 prototypes → 2 experts")


def load_sections(directory: Path) -> dict:
    """``{section: AnnData}`` from ``{directory}/{section}.h5ad`` (raw counts in ``layers['counts']`` or ``.X``)."""
    import anndata as ad

    out = {}
    for sec in SECTIONS:
        path = directory / f"{sec}.h5ad"
        if not path.exists():
            cands = sorted(directory.glob(f"*{sec}*.h5ad"))
            if not cands:
                raise FileNotFoundError(
                    f"no features for section {sec} in {directory}; run "
                    f"`python bench/extract_her2st_features.py --out {directory}` first."
                )
            path = cands[0]
        a = ad.read_h5ad(path)
        if "counts" in a.layers:
            a.X = a.layers["counts"]
        for k in list(a.layers):
            del a.layers[k]
        a.obs = pd.DataFrame({"section": sec}, index=[f"{sec}_{i}" for i in a.obs_names])
        a.obsm = {"X_image": np.asarray(a.obsm["X_image"], dtype=np.float32)}
        a.uns = {}
        a.var_names_make_unique()
        out[sec] = a
    return out


def _fold(sections: dict, test_sec: str):
    import anndata as ad

    train = ad.concat([sections[s] for s in SECTIONS if s != test_sec], join="inner")
    test = sections[test_sec]
    genes = train.var_names.intersection(test.var_names)
    return train[:, genes].copy(), test[:, genes].copy()


def _score(fold, seed, emb_train, emb_test, pred, seconds, config, tau, tag) -> dict:
    """Probe and retrieval Pearson of one method on one held-out section."""
    import spade_sc as ss
    from spade_sc.tl._probe import pearson_columns

    train, test = fold["train"], fold["test"]
    train.obsm["X_eval"], test.obsm["X_eval"] = emb_train, emb_test
    _, summ = ss.tl.expression_probe(
        train, test, use_rep="X_eval", genes=fold["genes"], random_state=0, **config.probe
    )
    return {
        "section": fold["section"],
        "seed": seed,
        "method": tag,
        "tau": tau,
        "probe": float(summ["mean_pearson"].iloc[0]),
        "retrieval": float(np.nanmean(pearson_columns(fold["y_test"], pred))),
        "fit_s": seconds,
    }


def run(args) -> pd.DataFrame:
    import torch

    import spade_sc as ss
    from spade_sc.tl._predict import normalized_expression
    from spade_sc.tl._probe import hest_gene_panel

    torch.set_num_threads(args.threads)
    ss.settings.progress_bar = False
    sections = load_sections(Path(args.features))
    rows, failures = [], []
    configs = [c for c in CONFIGS if not args.quick or c.name in QUICK]
    for test_sec in args.sections or SECTIONS:
        train, test = _fold(sections, test_sec)
        probe_genes = hest_gene_panel([train], 50, restrict_to=test.var_names)
        y_test = normalized_expression(test, probe_genes)
        ss.pp.select_genes(train, batch_key="section", n_top_genes=N_TOP_GENES)

        fold = {"section": test_sec, "train": train, "test": test, "genes": probe_genes, "y_test": y_test}
        for config in configs:
            if config.n_prototypes is None:
                t = time.perf_counter()
                q = test.copy()
                ss.tl.predict_expression(q, None, reference=train, k=args.k, genes=probe_genes)
                pred, seconds = q.obsm["spade_predicted"], time.perf_counter() - t
                emb = (train.obsm["X_image"], test.obsm["X_image"])
                rows.append(_score(fold, 0, *emb, pred, seconds, config, np.nan, config.name))
                continue
            fit = {**FIT, **config.fit}
            if args.epochs is not None:
                fit["max_epochs"] = args.epochs
            for seed in range(args.seeds):
                t = time.perf_counter()
                try:
                    model = ss.tl.fit_spade(
                        train,
                        batch_key="section",
                        n_prototypes=config.n_prototypes,
                        n_experts=config.n_experts,
                        random_state=seed,
                        **fit,
                    )
                except ValueError as err:  # e.g. an expert of a single outlier spot
                    print(f"  {config.name}, held-out {test_sec}, seed {seed}: fit failed: {err}", flush=True)
                    failures.append((config.name, test_sec, seed))
                    continue
                fit_s = time.perf_counter() - t
                for tau in config.taus:
                    e_tr, _ = model.get_embedding(train, tau=tau)
                    e_te, _ = model.get_embedding(test, tau=tau)
                    q = test.copy()
                    ss.tl.predict_expression(q, model, reference=train, k=args.k, tau=tau, genes=probe_genes)
                    tag = config.name if len(config.taus) == 1 else f"{config.name}, τ={tau:g}"
                    rows.append(
                        _score(fold, seed, e_tr, e_te, q.obsm["spade_predicted"], fit_s, config, tau, tag)
                    )
        if args.verbose:
            last = pd.DataFrame(rows)
            print(
                last[last["section"] == test_sec]
                .groupby("method", sort=False)[["probe", "retrieval"]]
                .mean()
                .round(3)
                .to_string(),
                flush=True,
            )
        print(f"held-out {test_sec}: done ({len(rows)} rows)", flush=True)
    if failures:
        print(
            f"{len(failures)} fit(s) failed; their methods are averaged over the remaining folds: {failures}"
        )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over sections per seed, then mean ± sd over seeds; per-section means over seeds."""
    order = list(dict.fromkeys(df["method"]))
    per_seed = df.groupby(["method", "seed"])[["probe", "retrieval"]].mean()
    agg = per_seed.groupby("method").agg(["mean", "std"]).fillna(0.0)
    per_sec = df.groupby(["method", "section"])["probe"].mean().unstack("section")
    out = pd.DataFrame(index=order)
    out["probe"] = agg[("probe", "mean")]
    out["probe_sd"] = agg[("probe", "std")]
    out["retrieval"] = agg[("retrieval", "mean")]
    out["retrieval_sd"] = agg[("retrieval", "std")]
    for s in per_sec.columns:
        out[f"probe {s}"] = per_sec[s]
    out["fit s"] = df.groupby("method")["fit_s"].mean()
    out["seeds"] = df.groupby("method")["seed"].nunique()
    out["n"] = df.groupby("method").size()
    return out


def to_markdown(summary: pd.DataFrame) -> str:
    secs = [c for c in summary.columns if c.startswith("probe ")]
    head = ["method", "probe Pearson", "Δ vs encoder", "retrieval Pearson", *secs, "fit (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = summary["probe"].iloc[0]
    expected = summary.loc[summary.index[1:], "n"].max() if len(summary) > 1 else summary["n"].max()
    for name, r in summary.iterrows():
        if r["n"] < expected and not name.startswith("encoder"):
            name = f"{name} ({expected - r['n']} of {expected} fits failed)"
        cells = [
            name,
            f"{r['probe']:.3f} ± {r['probe_sd']:.3f}",
            f"{r['probe'] - base:+.3f}",
            f"{r['retrieval']:.3f} ± {r['retrieval_sd']:.3f}",
            *[f"{r[s]:.3f}" for s in secs],
            f"{r['fit s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s), Python {platform.python_version()}"
    )


def write_docs(block: str, path: Path = DOCS) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {START} / {END}")
    new = re.sub(
        re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{block}\n{END}", text, flags=re.DOTALL
    )
    path.write_text(new)
    print(f"wrote the table into {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", default="/tmp/her2st_feats", help="directory with {section}.h5ad")
    p.add_argument(
        "--quick", action="store_true", help="1 seed, three methods, two held-out sections (≈ 1 min)"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--epochs", type=int, default=None, help=f"override max_epochs (default {FIT['max_epochs']})"
    )
    p.add_argument("--k", type=int, default=50, help="retrieval neighbours")
    p.add_argument("--sections", nargs="*", default=None, help="held-out sections (default: all five)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)"
    )
    p.add_argument("--csv", default=None, help="write the per-fold rows here")
    p.add_argument("--write-docs", action="store_true", help=f"put the table into {DOCS}")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.sections = args.sections or ["C2", "C4"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    df = run(args)
    total = time.perf_counter() - t0
    if args.csv:
        df.to_csv(args.csv, index=False)
    summary = summarise(df)
    table = to_markdown(summary)
    cmd = "python bench/her2st.py " + " ".join(sys.argv[1:] if argv is None else argv)
    block = (
        f"{table}\n\nRegenerate: `{cmd.strip()}` — {total / 60:.1f} min on {machine()}; "
        f"{summary['seeds'].max()} seed(s); training settings {FIT}, gene panel top {N_TOP_GENES} HVGs per "
        "section."
    )
    print(block)
    if args.write_docs:
        write_docs(block)


if __name__ == "__main__":
    main()
