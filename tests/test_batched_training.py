"""Training all experts at once equals training them one after another."""

import math

import numpy as np
import torch
from torch.nn import functional as F

from spade_sc.model._data import ExpressionSource, expert_batches
from spade_sc.model._heads import ExpertPairs, ProjectionHead
from spade_sc.model._trainer import TrainConfig, _seed, train_experts


def _bleep_loss(img, spot, t=1.0):
    logits = spot @ img.T / t
    targets = F.softmax((img @ img.T + spot @ spot.T) / 2 * t, dim=-1)
    spots_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
    images_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((spots_loss + images_loss) / 2).mean()


def test_stacked_training_equals_sequential():
    rng = np.random.default_rng(0)
    n, d, g, p = 90, 6, 10, 8
    feats = rng.standard_normal((n, d)).astype(np.float32)
    counts = rng.poisson(3, (n, g)).astype(np.float32)
    # three experts of unequal sizes: different numbers of steps per epoch and a partial last batch
    spots = [np.arange(0, 50), np.arange(50, 72), np.arange(72, 90)]
    cfg = TrainConfig(max_epochs=3, batch_size=16, lr=1e-2, weight_decay=1e-2, temperature=1.0, random_state=3)
    gen = torch.Generator().manual_seed(5)
    pairs = ExpertPairs(3, d, g, p, dropout=0.0, generator=gen)
    init = [(pairs.image.to_single(e), pairs.expression.to_single(e)) for e in range(3)]
    # target_sum=10 keeps log1p(CP10) near 1: with log1p(CP10k) ≈ 7 on 10 genes, some GELU units of this tiny
    # head sit at pre-activations ≈ -7 for every spot, their weights get ~1e-11 gradients, and AdamW's
    # m/sqrt(v) turns float32 rounding noise into lr-sized steps: a comparison of noise, not of the method.
    expr = ExpressionSource(counts, np.arange(g), normalize=True, target_sum=10.0)
    empty = [np.zeros(0, dtype=np.int64)] * 3
    train_experts(pairs, feats, expr, spots, empty, cfg, torch.device("cpu"))

    for e in range(3):
        img_head, expr_head = init[e]
        params = list(img_head.parameters()) + list(expr_head.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_batches = math.ceil(len(spots[e]) / cfg.batch_size)
        total = n_batches * cfg.max_epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
        for epoch in range(cfg.max_epochs):
            idx, mask, _ = expert_batches(spots, cfg.batch_size, np.random.default_rng(_seed(3, epoch, 1)))
            for s in range(n_batches):
                rows = idx[s, e][mask[s, e]]
                x_img = torch.from_numpy(feats[rows])
                x_expr = torch.log1p(torch.from_numpy(counts[rows] * (10.0 / counts[rows].sum(1, keepdims=True))))
                loss = _bleep_loss(img_head(x_img), expr_head(x_expr), cfg.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        got_img = pairs.image.to_single(e).state_dict()
        got_expr = pairs.expression.to_single(e).state_dict()
        for k, v in img_head.state_dict().items():
            torch.testing.assert_close(got_img[k], v, rtol=1e-4, atol=1e-5, msg=f"expert {e} image {k}")
        for k, v in expr_head.state_dict().items():
            torch.testing.assert_close(got_expr[k], v, rtol=1e-4, atol=1e-5, msg=f"expert {e} expression {k}")


def test_stacked_head_matches_single_head():
    gen = torch.Generator().manual_seed(0)
    pairs = ExpertPairs(4, 5, 7, 6, dropout=0.1, generator=gen).eval()
    x = torch.randn(4, 3, 5)
    out = pairs.image(x)
    for e in range(4):
        single = pairs.image.to_single(e).eval()
        torch.testing.assert_close(out[e], single(x[e]))
        torch.testing.assert_close(pairs.image.forward_expert(x[e], e), single(x[e]))
    # round trip through a single head
    head = ProjectionHead(5, 6)
    pairs.image.load_single(2, head)
    torch.testing.assert_close(pairs.image.to_single(2).state_dict()["fc.weight"], head.fc.weight)
