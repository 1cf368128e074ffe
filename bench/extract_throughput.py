"""Patches/s of ``ss.pp.extract_features`` (read, crop, resample, normalise, encode) vs the encoder alone.

The image is a synthetic H&E-sized RGB array at 0.25 µm/px held in ``uns['spatial']`` (as
``ss.io.read_visium``/``read_hest`` store it); spots on a regular grid; patches of 224 px at 0.5 µm/px (HEST's
convention), so every patch is a 448-px crop resampled to 224 px. The encoder is the same module in both
measurements (eval, ``inference_mode``, channels-last on CPU, bf16 autocast on CUDA); "encoder alone" runs it
on random normalised ``[batch, 3, 224, 224]`` tensors already on the device.

Defaults: ``efficientnet_lite0`` (the offline encoder) on CPU; on CUDA ``--encoder vit_large_patch16_224``
gives a ViT-L/16 of UNI's size (random weights: ``timm.create_model(..., pretrained=False)``).
The last line is ``extract_patches_per_s=<a> encoder_alone_per_s=<b> fraction=<a/b>``.
"""

from __future__ import annotations

import time

import numpy as np

from _common import parser, setup_torch, sync


def make_adata(n_spots: int, *, spacing_px: int = 460, seed: int = 0):
    import anndata as ad
    import pandas as pd

    side = int(np.ceil(np.sqrt(n_spots)))
    size = side * spacing_px + 600
    rng = np.random.default_rng(seed)
    # H&E-like: pink/purple background with texture (random uint8 noise is incompressible: a fair read cost)
    img = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
    img += np.array([180, 120, 170], dtype=np.uint8)
    yy, xx = np.divmod(np.arange(n_spots), side)
    coords = np.stack([300 + xx * spacing_px, 300 + yy * spacing_px], 1).astype(np.float64)
    obs = pd.DataFrame({"library_id": pd.Categorical(["slide0"] * n_spots)},
                       index=[f"spot{i}" for i in range(n_spots)])
    a = ad.AnnData(obs=obs, obsm={"spatial": coords}, shape=(n_spots, 0))
    a.uns["spatial"] = {"slide0": {
        "images": {"hires": img},
        "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 220.0, "microns_per_pixel": 0.25},
    }}
    return a


def build_module(name: str):
    import timm

    if name == "efficientnet_lite0":
        from spade_sc.pp._encoders import build_encoder

        module, _ = build_encoder(name)
        return module
    return timm.create_model(name, pretrained=False, num_classes=0)


def encoder_alone(module, *, device, batch_size: int, n_batches: int, amp: bool) -> float:
    import torch

    x = torch.randn(batch_size, 3, 224, 224, device=device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    module = module.to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        module(x)  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(n_batches):
            out = module(x)
            out.float().cpu()
        sync(device)
    return batch_size * n_batches / (time.perf_counter() - t)


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--encoder", default=None, help="efficientnet_lite0 (CPU default) or a timm name")
    ap.add_argument("--n-patches", type=int, default=None, help="patches (default 128 quick / 2,048 full)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    setup_torch(args)
    import torch

    import spade_sc as ss

    device = torch.device(args.device)
    name = args.encoder or ("vit_large_patch16_224" if device.type == "cuda" else "efficientnet_lite0")
    n = args.n_patches or (128 if args.quick else 2048)
    amp = device.type == "cuda"
    module = build_module(name)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"encoder {name} ({n_params / 1e6:.0f} M parameters) on {device}, batch {args.batch_size}, "
          f"{'bf16 autocast' if amp else 'float32'}")
    adata = make_adata(n)
    img = adata.uns["spatial"]["slide0"]["images"]["hires"]
    print(f"image {img.shape[1]}×{img.shape[0]} px at 0.25 µm/px, {n} spots; patches 224 px at 0.5 µm/px")

    # warm-up (builds and caches nothing that the timed run would not have: the module is passed in)
    warm = make_adata(args.batch_size, seed=1)
    ss.pp.extract_features(warm, model=module, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           batch_size=args.batch_size, device=args.device, amp=amp)
    pipe = alone = 0.0
    for _ in range(2):  # alternate the two measurements, best of each (the machine is shared and noisy)
        sync(device)
        t = time.perf_counter()
        ss.pp.extract_features(adata, model=module, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                               batch_size=args.batch_size, device=args.device, amp=amp)
        sync(device)
        pipe = max(pipe, n / (time.perf_counter() - t))
        alone = max(alone, encoder_alone(module, device=device, batch_size=args.batch_size,
                                         n_batches=max(2, n // args.batch_size), amp=amp))
    t = time.perf_counter()
    ss.pp.extract_patches(adata, patch_size=224, mpp=0.5)
    print(f"reading + cropping + resampling alone (ss.pp.extract_patches): {n / (time.perf_counter() - t):,.0f} "
          "patches/s")
    print(f"extract_features: {pipe:,.1f} patches/s; encoder alone: {alone:,.1f} patches/s")
    print(f"extract_patches_per_s={pipe:.1f} encoder_alone_per_s={alone:.1f} fraction={pipe / alone:.2f}")


if __name__ == "__main__":
    main()
