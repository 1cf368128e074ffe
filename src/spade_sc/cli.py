"""The ``spade-sc`` command: ``demo``, ``fit``, ``embed``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("spade_sc")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    import spade_sc as ss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say("[1/5] generating toy data (4 slides, 1,600 spots, H&E + counts)", args.quiet)
    adata = ss.datasets.toy(random_state=args.seed)
    _say("[2/5] selecting the gene panel (top HVGs per slide)", args.quiet)
    ss.pp.select_genes(adata, batch_key="slide", n_top_genes=50)
    _say(f"      {int(adata.var['spade_gene'].sum())} genes", args.quiet)
    _say(f"[3/5] fitting SPADE ({args.epochs} epochs)", args.quiet)
    model = ss.tl.fit_spade(
        adata,
        batch_key="slide",
        n_prototypes=8,
        n_experts=4,
        max_epochs=args.epochs,
        lr=1e-3,
        random_state=args.seed,
        device=args.device,
    )
    _say(f"      {model!r}", args.quiet)
    _say("[4/5] embedding", args.quiet)
    ss.tl.embed(adata, model)
    ari = adjusted_rand_score(adata.obs["domain"], adata.obs["spade_expert"])
    _say(f"      experts vs. true tissue domains: ARI = {ari:.3f}", args.quiet)
    _say("[5/5] writing results", args.quiet)
    adata.write_h5ad(out / "toy_spade.h5ad")
    model.save(out / "model", overwrite=True)
    slides = list(adata.obs["slide"].cat.categories)
    fig, axes = plt.subplots(1, len(slides), figsize=(4.5 * len(slides), 4.5))
    for ax, slide in zip(np.atleast_1d(axes), slides, strict=True):
        ss.pl.experts(adata, library_id=slide, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=80)
    plt.close(fig)
    for name in ("toy_spade.h5ad", "model/config.json", "model/model.safetensors", "experts.png"):
        _say(f"      wrote {out / name}", args.quiet)
    _say(f"done in {time.perf_counter() - t0:.1f} s", args.quiet)
    return 0


def _fit(args) -> int:
    import anndata as ad

    import spade_sc as ss

    adata = ad.read_h5ad(args.input)
    if args.select_genes:
        ss.pp.select_genes(adata, batch_key=args.batch_key, n_top_genes=args.n_top_genes, layer=args.layer)
    model = ss.tl.fit_spade(
        adata,
        use_rep=args.use_rep,
        layer=args.layer,
        batch_key=args.batch_key,
        group_key=args.group_key,
        n_prototypes=args.n_prototypes,
        n_experts=args.n_experts,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        random_state=args.seed,
        checkpoint_dir=args.checkpoint_dir,
    )
    model.save(args.model, overwrite=args.overwrite)
    _say(f"saved {model!r} to {args.model}", args.quiet)
    if args.output:
        ss.tl.embed(adata, model, use_rep=args.use_rep)
        adata.write_h5ad(args.output)
        _say(f"wrote {args.output}", args.quiet)
    return 0


def _embed(args) -> int:
    import anndata as ad

    import spade_sc as ss

    adata = ad.read_h5ad(args.input)
    model = ss.SpadeModel.load(args.model, device=args.device)
    ss.tl.embed(adata, model, use_rep=args.use_rep, tau=args.tau)
    adata.write_h5ad(args.output)
    _say(f"wrote {args.output}", args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spade-sc", description="SPADE for scverse: fit and embed H&E + ST.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    def common(p):
        p.add_argument("--device", default=None, help="torch device (default: CUDA when available, else CPU)")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("-q", "--quiet", action="store_true", help="print only errors")

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in toy data")
    p.add_argument("--out", default="spade_demo", help="output directory (default: ./spade_demo)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    common(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("fit", help="fit SPADE on an .h5ad with image features and counts")
    p.add_argument("input", help="input .h5ad (features in .obsm[USE_REP], raw counts in .X or --layer)")
    p.add_argument("--model", required=True, help="directory to save the model in")
    p.add_argument("--output", help="also embed and write the annotated .h5ad here")
    p.add_argument("--use-rep", default="X_image")
    p.add_argument("--layer", default=None)
    p.add_argument("--batch-key", default=None)
    p.add_argument("--group-key", default=None)
    p.add_argument("--select-genes", action="store_true", help="run ss.pp.select_genes first")
    p.add_argument("--n-top-genes", type=int, default=50)
    p.add_argument("--n-prototypes", type=int, default=16)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    common(p)
    p.set_defaults(func=_fit)

    p = sub.add_parser("embed", help="embed an .h5ad with a saved model")
    p.add_argument("input")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--use-rep", default="X_image")
    p.add_argument("--tau", type=float, default=0.1)
    common(p)
    p.set_defaults(func=_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"spade-sc {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
