"""Training throughput of ``ss.tl.fit_spade`` on HEST-shaped synthetic data.

Compares spots·epochs per second of ``fit_spade`` with

(a) a reference pipeline in the authors' style: the 16 experts trained one after another, each with a
    per-spot ``torch.utils.data.Dataset`` (one dense expression row + one feature vector per item) and a
    ``DataLoader`` (batch size 128, shuffled), ``nn.Module`` projection heads, ``torch.optim.AdamW`` with a
    per-batch cosine schedule, BLEEP's loss: the same heads, loss, epochs, batch size and spots per expert;

(b) a roofline: the FLOPs one epoch must do (forward + backward of both heads and the loss matrix products,
    counted below) divided by the rate of a large float32 ``torch.mm`` timed in the same run.

FLOPs per spot (``D`` features, ``G`` genes, ``P`` joint dim): each head does ``2·in·P + 2·P·P`` forward,
the same again for the weight gradients and ``2·P·P`` for the input gradient of its second layer (the
input gradient of the first layer is not needed), i.e. ``4·in·P + 6·P·P``. The loss does three ``B×B×P``
products forward and six backward per minibatch of ``B`` spots: ``18·B·P`` per spot.

Per-epoch time of ``fit_spade`` is the time of its training loop (``train_experts``, timed by a wrapper;
clustering and set-up excluded) over ``--epochs`` epochs, after a one-epoch warm-up fit. The last line is ``speedup_vs_reference=<x> fraction_of_gemm_roofline=<y>``.
"""

from __future__ import annotations

import time

import numpy as np

from _common import FEATURE_DIM, N_EXPERTS, N_GENES, gemm_rate, parser, setup_torch, sync, synthetic_adata


def _reference_epoch(feats, expr_dense, spots_per_expert, *, proj_dim, batch_size, device, lr=1e-4, wd=1e-2):
    """One epoch of the authors'-style pipeline over all experts, one after another; returns seconds."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ProjectionHead(nn.Module):
        def __init__(self, embedding_dim, projection_dim, dropout=0.1):
            super().__init__()
            self.projection = nn.Linear(embedding_dim, projection_dim)
            self.gelu = nn.GELU()
            self.fc = nn.Linear(projection_dim, projection_dim)
            self.dropout = nn.Dropout(dropout)
            self.layer_norm = nn.LayerNorm(projection_dim)

        def forward(self, x):
            projected = self.projection(x)
            x = self.gelu(projected)
            x = self.fc(x)
            x = self.dropout(x)
            x = x + projected
            return self.layer_norm(x)

    class BLEEP(nn.Module):
        def __init__(self, image_dim, spot_dim, projection_dim, temperature=1.0):
            super().__init__()
            self.image_projection = ProjectionHead(image_dim, projection_dim)
            self.spot_projection = ProjectionHead(spot_dim, projection_dim)
            self.temperature = temperature

        def forward(self, batch):
            image_embeddings = self.image_projection(batch["image_features"])
            spot_embeddings = self.spot_projection(batch["reduced_expression"])
            logits = (spot_embeddings @ image_embeddings.T) / self.temperature
            images_similarity = image_embeddings @ image_embeddings.T
            spots_similarity = spot_embeddings @ spot_embeddings.T
            targets = F.softmax((images_similarity + spots_similarity) / 2 * self.temperature, dim=-1)
            spots_loss = (-targets * nn.LogSoftmax(dim=-1)(logits)).sum(1)
            images_loss = (-targets.T * nn.LogSoftmax(dim=-1)(logits.T)).sum(1)
            return ((images_loss + spots_loss) / 2.0).mean()

    class SpotDataset(torch.utils.data.Dataset):
        def __init__(self, feats, expr, spots):
            self.feats, self.expr, self.spots = feats, expr, spots

        def __len__(self):
            return len(self.spots)

        def __getitem__(self, i):
            s = self.spots[i]
            return {
                "image_features": torch.tensor(self.feats[s], dtype=torch.float32),
                "reduced_expression": torch.tensor(self.expr[s], dtype=torch.float32),
            }

    total = 0.0
    for e, spots in enumerate(spots_per_expert):
        torch.manual_seed(e)
        model = BLEEP(feats.shape[1], expr_dense.shape[1], proj_dim).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        loader = torch.utils.data.DataLoader(SpotDataset(feats, expr_dense, spots), batch_size=batch_size,
                                             shuffle=True, num_workers=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, len(loader)))
        sync(device)
        t = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        sync(device)
        total += time.perf_counter() - t
    return total


def copy_bandwidth(device: str = "cpu", n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s (read + write) of a large tensor copy."""
    import torch

    a = torch.ones(n_bytes // 4, device=device)
    b = torch.empty_like(a)
    best = np.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def epoch_adamw_bytes(sizes, batch_size, d, g, p) -> float:
    """AdamW's memory traffic in one epoch: every step reads parameter, gradient and both moments and writes
    parameter and moments (7 × 4 bytes) for every parameter of every active expert."""
    per_expert = (d * p + p + p * p + p + 2 * p) + (g * p + p + p * p + p + 2 * p)
    steps = sum(-(-int(n) // batch_size) for n in sizes)
    return 28.0 * per_expert * steps


def epoch_flops(sizes, batch_size, d, g, p) -> float:
    head = 4 * d * p + 6 * p * p + 4 * g * p + 6 * p * p
    total = 0.0
    for n in sizes:
        total += n * head
        full, rest = divmod(int(n), batch_size)
        total += 18 * p * (full * batch_size**2 + rest**2)
    return total


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--n-spots", type=int, default=None, help="spots (default 6,144 quick / 32,768 full)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs (default 2 quick / 3 full)")
    ap.add_argument("--precision", default="32", help="fit precision: 32 or bf16 (CUDA)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference pipeline")
    args = ap.parse_args()
    setup_torch(args)
    import torch

    import spade_sc as ss

    n = args.n_spots or (6144 if args.quick else 32768)
    epochs = args.epochs or (2 if args.quick else 3)
    bs, p_dim = 128, 256
    print(f"data: {n} spots, {N_GENES} genes (5% non-zero, CSR), {FEATURE_DIM}-d features, {N_EXPERTS} experts; "
          f"device={args.device} threads={torch.get_num_threads()}")
    t = time.perf_counter()
    adata = synthetic_adata(n)
    print(f"  built in {time.perf_counter() - t:.1f} s")

    kw = dict(n_prototypes=N_EXPERTS, n_experts=N_EXPERTS, batch_size=bs, proj_dim=p_dim, val_fraction=0.0,
              device=args.device, precision=args.precision, random_state=0)
    import spade_sc.model._trainer as trainer

    timings = []
    orig = trainer.train_experts

    def timed(*a, **k):  # time the training loop itself (clustering and set-up excluded)
        sync(args.device)
        t0 = time.perf_counter()
        out = orig(*a, **k)
        sync(args.device)
        timings.append(time.perf_counter() - t0)
        return out

    trainer.train_experts = timed
    ss.tl.fit_spade(adata, max_epochs=1, **kw)  # warm-up: compiled kernels, caches
    model = ss.tl.fit_spade(adata, max_epochs=epochs, **kw)
    trainer.train_experts = orig
    per_epoch = timings[-1] / epochs
    ours = n / per_epoch
    experts = model.train_labels_["expert"].to_numpy()
    spots = [np.flatnonzero(experts == e) for e in range(model.n_experts_)]
    sizes = [len(s) for s in spots]
    print(f"  expert sizes: min {min(sizes)}, median {int(np.median(sizes))}, max {max(sizes)}")
    print(f"fit_spade: {per_epoch:.2f} s/epoch, {ours:,.0f} spots·epochs/s")

    gemm = gemm_rate(args.device)
    flops = epoch_flops(sizes, bs, FEATURE_DIM, N_GENES, p_dim)
    roof_s = flops / gemm
    frac = roof_s / per_epoch
    print(f"GEMM rate (fp32 4096³ torch.mm): {gemm / 1e9:.1f} GFLOP/s; epoch needs {flops / 1e9:.1f} GFLOP "
          f"(dense) -> GEMM roofline {roof_s:.2f} s/epoch ({n / roof_s:,.0f} spots·epochs/s)")
    bw = copy_bandwidth(args.device)
    opt_s = epoch_adamw_bytes(sizes, bs, FEATURE_DIM, N_GENES, p_dim) / bw
    print(f"memory bandwidth (tensor copy): {bw / 1e9:.1f} GB/s; AdamW alone must move "
          f"{epoch_adamw_bytes(sizes, bs, FEATURE_DIM, N_GENES, p_dim) / 1e9:.1f} GB/epoch -> {opt_s:.2f} s/epoch; "
          f"fraction of max(GEMM, AdamW-bandwidth) bound: {max(roof_s, opt_s) / per_epoch:.3f}")

    if args.no_reference:
        speedup = float("nan")
    else:
        x = adata.X
        scale = 1e4 / np.asarray(x.sum(1)).ravel()
        dense = np.log1p(x.multiply(scale[:, None]).toarray().astype(np.float32))  # preloaded, as the authors do
        feats = np.asarray(adata.obsm["X_image"], dtype=np.float32)
        ref_s = _reference_epoch(feats, dense, spots, proj_dim=p_dim, batch_size=bs, device=args.device)
        ref = n / ref_s
        speedup = ours / ref
        print(f"reference (16 sequential experts, per-spot Dataset + DataLoader): {ref_s:.2f} s/epoch, "
              f"{ref:,.0f} spots·epochs/s; fraction of roofline {roof_s / ref_s:.3f}")
    print(f"speedup_vs_reference={speedup:.2f} fraction_of_gemm_roofline={frac:.3f}")


if __name__ == "__main__":
    main()
