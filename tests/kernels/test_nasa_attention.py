"""NASA dual cross-attention: Triton kernel vs the fp32 reference (two softmax attentions and a scaled subtract).

Without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
"""

import pytest
import torch

from fewstep.kernels.reference import nasa_attention_ref
from tests.kernels.conftest import DEVICE, cuda_only, kernel_module

na = kernel_module("nasa_attention", "_nasa_attention_kernel", "block_sparse_attention")


def _qkv(B, H, n_q, n_k, m_k, D, dtype, device=DEVICE):
    q = torch.randn(B, H, n_q, D, device=device, dtype=dtype)
    kp, vp = (torch.randn(B, H, n_k, D, device=device, dtype=dtype) for _ in range(2))
    kn, vn = (torch.randn(B, H, m_k, D, device=device, dtype=dtype) for _ in range(2))
    return q, kp, vp, kn, vn


def _prefix_mask(lengths, n):
    return (torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]).view(-1, 1, 1, n)


@pytest.mark.parametrize("B,H,n_q,n_k,m_k,D", [(2, 3, 37, 13, 9, 24), (1, 2, 70, 77, 77, 64), (3, 1, 5, 20, 31, 40)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference(seed, B, H, n_q, n_k, m_k, D, dtype):
    q, kp, vp, kn, vn = _qkv(B, H, n_q, n_k, m_k, D, dtype)
    alpha = torch.rand(B, device=DEVICE)
    out = na.nasa_attention(q, kp, vp, kn, vn, alpha, block_m=16, block_n=16)
    ref = nasa_attention_ref(q, kp, vp, kn, vn, alpha)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_key_lengths_and_zero_alpha(seed):
    B, H, n_q, n_k, m_k, D = 3, 2, 19, 23, 17, 32
    q, kp, vp, kn, vn = _qkv(B, H, n_q, n_k, m_k, D, torch.float16)
    lp = torch.tensor([23, 5, 11], device=DEVICE)
    ln = torch.tensor([1, 17, 9], device=DEVICE)
    alpha = torch.tensor([0.0, 0.5, 1.3], device=DEVICE)
    out = na.nasa_attention(q, kp, vp, kn, vn, alpha, len_pos=lp, len_neg=ln, block_m=16, block_n=16)
    ref = nasa_attention_ref(q, kp, vp, kn, vn, alpha, mask_pos=_prefix_mask(lp, n_k), mask_neg=_prefix_mask(ln, m_k))
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=f"seed {seed}")


def test_strided_views(seed):
    # [B, N, H, D] buffers passed as transposed views, as the attention processor does
    B, H, n_q, n_k, D = 2, 3, 21, 11, 16
    q = torch.randn(B, n_q, H, D, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    kp, vp, kn, vn = (torch.randn(B, n_k, H, D, device=DEVICE, dtype=torch.float16).transpose(1, 2)
                      for _ in range(4))
    out = na.nasa_attention(q, kp, vp, kn, vn, 0.8, block_m=16, block_n=16)
    ref = nasa_attention_ref(q, kp, vp, kn, vn, 0.8)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=f"seed {seed}")


def test_bad_arguments():
    q, kp, vp, kn, vn = _qkv(1, 1, 4, 4, 4, 16, torch.float16)
    with pytest.raises(TypeError):
        na.nasa_attention(q.float(), kp, vp, kn, vn, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        na.nasa_attention(q, kp, vp, kn, vn, torch.ones(3))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sd_turbo_shape(dtype, seed):
    q, kp, vp, kn, vn = _qkv(2, 5, 4096, 77, 77, 64, dtype, device="cuda")
    alpha = torch.tensor([0.0, 0.5], device="cuda")
    out = na.nasa_attention(q, kp, vp, kn, vn, alpha)
    ref = nasa_attention_ref(q, kp, vp, kn, vn, alpha)
    # flash-attention-style tolerances for half-precision outputs
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 if dtype == torch.float16 else 3e-2,
                               msg=f"seed {seed}")
