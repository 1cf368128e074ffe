"""The CUDA path of ``fit_spade`` / ``embed`` agrees with the CPU path (skipped without a CUDA device)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import spade_sc as ss

pytestmark = pytest.mark.gpu

KW = {"n_prototypes": 4, "n_experts": 2, "proj_dim": 32, "max_epochs": 3, "random_state": 0}


@pytest.fixture
def no_tf32():
    """Full float32 matmuls on the GPU, so that CUDA and CPU differ only by summation order."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_fit_and_embed_match_cpu(small_toy, no_tf32, sparse):
    data = small_toy.copy()
    data.X = sp.csr_matrix(data.X) if sparse else np.asarray(data.X.todense() if sp.issparse(data.X) else data.X)
    fits = {}
    for device in ("cpu", "cuda"):
        a = data.copy()
        model = ss.tl.fit_spade(a, batch_key="slide", device=device, **KW)
        ss.tl.embed(a, model)
        fits[device] = (model, a)
    (m_cpu, a_cpu), (m_gpu, a_gpu) = fits["cpu"], fits["cuda"]
    assert (a_cpu.obs["spade_expert"] == a_gpu.obs["spade_expert"]).all()
    for k, v in m_cpu.pairs_.state_dict().items():
        torch.testing.assert_close(m_gpu.pairs_.state_dict()[k].cpu(), v, rtol=1e-3, atol=1e-4, msg=k)
    np.testing.assert_allclose(a_gpu.obsm["X_spade"], a_cpu.obsm["X_spade"], rtol=1e-3, atol=1e-3)


def test_cuda_bf16_fit_is_close_to_fp32(small_toy):
    a, b = small_toy.copy(), small_toy.copy()
    fp32 = ss.tl.fit_spade(a, batch_key="slide", device="cuda", **KW)
    bf16 = ss.tl.fit_spade(b, batch_key="slide", device="cuda", precision="bf16", **KW)
    ss.tl.embed(a, fp32)
    ss.tl.embed(b, bf16)
    assert np.isfinite(b.obsm["X_spade"]).all() and b.obsm["X_spade"].dtype == np.float32
    # same experts and prototypes (clustering does not depend on precision); embeddings close per spot
    assert (a.obs["spade_expert"] == b.obs["spade_expert"]).all()
    cos = (a.obsm["X_spade"] * b.obsm["X_spade"]).sum(1) / (
        np.linalg.norm(a.obsm["X_spade"], axis=1) * np.linalg.norm(b.obsm["X_spade"], axis=1)
    )
    assert np.median(cos) > 0.98, np.median(cos)
