"""Read the five her2st sections and extract image features; one ``{section}.h5ad`` per section.

Each section is read with :func:`spade_sc.io.read_her2st` (raw counts in ``.X`` and ``layers['counts']``, spot
centres in ``obsm['spatial']``, µm/px from the 200 µm array pitch), then
:func:`spade_sc.pp.extract_features` crops 224 px at 0.5 µm/px around every spot (resampled from ≈ 0.688
µm/px) and encodes it (default: the offline ImageNet EfficientNet-Lite0) into ``obsm['X_image']``.

Printed: patches/s end to end (JPEG decode + crops + encoder, per section and overall) and the encoder alone
on random tensors of the same shape, for comparison. Also written to ``{out}/timing.json``.

Run::

    python bench/extract_her2st_features.py --out /tmp/her2st_feats
    python bench/extract_her2st_features.py --out feats --model resnet50 --device cuda --batch-size 128

Data: ``--data`` (default ``../shared/data/her2st`` beside the repository), or ``--download`` to fetch the
public files with :func:`spade_sc.datasets.her2st`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SECTIONS = ("C2", "C3", "C4", "C5", "C6")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def encoder_alone(model: str, *, batch_size: int, device: str | None, n_batches: int = 3) -> float:
    """Images/s of the encoder on random 224 px batches (after one warm-up batch)."""
    import torch

    from spade_sc._utils import resolve_device
    from spade_sc.pp._features import _cached_encoder

    module, info = _cached_encoder(model, None, None)
    dev = resolve_device(device)
    module.to(dev)
    x = torch.randn(
        batch_size, 3, info.input_size, info.input_size, generator=torch.Generator().manual_seed(0)
    )
    x = x.to(dev)
    if dev.type == "cpu":
        module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        module(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            module(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return n_batches * batch_size / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for {section}.h5ad")
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="her2st data directory (ST-cnts, ST-spotfiles, ST-imgs)"
    )
    p.add_argument("--download", action="store_true", help="fetch the files with ss.datasets.her2st instead")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS))
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="local checkpoint for the encoder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--num-workers", type=int, default=1, help="threads cropping patches")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import spade_sc as ss

    if args.threads:
        torch.set_num_threads(args.threads)
    ss.settings.progress_bar = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for sec in args.sections:
        t0 = time.perf_counter()
        if args.download:
            adata = ss.datasets.her2st(sec, progressbar=True)
        else:
            adata = ss.io.read_her2st(args.data, sec)
        t_read = time.perf_counter() - t0
        t1 = time.perf_counter()
        ss.pp.extract_features(
            adata, model=args.model, weights=args.weights, batch_size=args.batch_size, device=args.device,
            num_workers=args.num_workers,
        )  # fmt: skip
        t_feat = time.perf_counter() - t1
        adata.write_h5ad(out / f"{sec}.h5ad")
        mpp = adata.uns["spatial"][sec]["scalefactors"]["microns_per_pixel"]
        rows.append({"section": sec, "n_spots": adata.n_obs, "mpp": mpp, "read_s": t_read, "features_s": t_feat,
                     "patches_per_s": adata.n_obs / t_feat})  # fmt: skip
        print(f"{sec}: {adata.n_obs} spots, {mpp:.4f} µm/px, read {t_read:.1f} s, features {t_feat:.1f} s "
              f"({adata.n_obs / t_feat:.1f} patches/s) → {out / f'{sec}.h5ad'}", flush=True)  # fmt: skip
    total = time.perf_counter() - t_all
    n = sum(r["n_spots"] for r in rows)
    feat_s = sum(r["features_s"] for r in rows)
    alone = encoder_alone(args.model, batch_size=args.batch_size, device=args.device)
    summary = {
        "model": args.model, "device": str(ss._utils.resolve_device(args.device)),
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "n_spots": n,
        "patches_per_s_extract_features": n / feat_s, "patches_per_s_including_reading": n / total,
        "encoder_alone_images_per_s": alone, "total_s": total, "sections": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }  # fmt: skip
    (out / "timing.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{n} spots in {total:.1f} s; extract_features {n / feat_s:.1f} patches/s "
          f"(JPEG decode + crop/resample + {args.model}); encoder alone on random tensors {alone:.1f} images/s; "
          f"{summary['machine']}")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
