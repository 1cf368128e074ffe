import numpy as np
import pytest
import torch

from spade_sc.model import soft_clip_loss


def _np_log_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def _np_bleep_loss(img, spot, t=1.0):
    """BLEEP's loss, written independently in float64 NumPy from the authors' formula."""
    logits = spot @ img.T / t
    sim = (img @ img.T + spot @ spot.T) / 2 * t
    targets = np.exp(_np_log_softmax(sim, 1))
    spots_loss = -(targets * _np_log_softmax(logits, 1)).sum(1)
    images_loss = -(targets.T * _np_log_softmax(logits.T, 1)).sum(1)
    return ((spots_loss + images_loss) / 2).mean()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_loss_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((3, 7, 5))
    spot = rng.standard_normal((3, 7, 5))
    got = soft_clip_loss(torch.tensor(img), torch.tensor(spot), temperature).numpy()
    want = [_np_bleep_loss(img[e], spot[e], temperature) for e in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masked_loss_equals_unpadded():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((2, 6, 4))
    spot = rng.standard_normal((2, 6, 4))
    mask = np.zeros((2, 6), dtype=bool)
    mask[0, :6] = True
    mask[1, :3] = True
    # padding rows hold garbage that must not leak into the loss
    img[1, 3:] = 1e3
    spot[1, 3:] = -1e3
    got = soft_clip_loss(torch.tensor(img), torch.tensor(spot), 1.0, torch.tensor(mask)).numpy()
    want = [_np_bleep_loss(img[0], spot[0]), _np_bleep_loss(img[1, :3], spot[1, :3])]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_loss_is_minimised_by_aligned_pairs():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((1, 16, 8)) * 3)
    aligned = soft_clip_loss(x, x).item()
    shuffled = soft_clip_loss(x, x[:, torch.randperm(16)]).item()
    assert aligned < shuffled
