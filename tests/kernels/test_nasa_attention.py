"""NASA dual cross-attention: Triton kernel vs the fp32 reference (two softmax attentions and a scaled subtract).

Without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
"""

import pytest
import torch

from fewstep.kernels.nasa_processor import nag_renorm
from fewstep.kernels.reference import nag_attention_ref, nasa_attention_ref
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


def _nag_fused(q, kp, vp, kn, vn, phi, tau, alpha, **kw):
    """NAG from the kernel's two outputs, as the attention processor combines them: the kernel's combination at
    alpha' = (phi - 1) / phi is Z~ / phi, and Z+ comes back beside it."""
    comb, pos = na.nasa_attention(q, kp, vp, kn, vn, (phi - 1) / phi, return_pos=True, block_m=16, block_n=16, **kw)
    return nag_renorm(pos, phi.view(-1, 1, 1, 1) * comb.float(), tau, alpha), pos


def _clipped_tokens(q, kp, vp, kn, vn, phi, tau, **kw):
    """How many (image, token) pairs the tau clip changes (so the tests below exercise it, not just the blend)."""
    pos = nasa_attention_ref(q, kp, vp, kn, vn, 0.0, **kw)
    guided = nasa_attention_ref(q, kp, vp, kn, vn, (phi - 1) / phi, **kw) * phi.view(-1, 1, 1, 1)
    ratio = guided.abs().sum((1, 3)) / pos.abs().sum((1, 3))
    return int((ratio > tau.view(-1, 1)).sum()), int((ratio <= tau.view(-1, 1)).sum())


@pytest.mark.parametrize("B,H,n_q,n_k,m_k,D", [(2, 3, 37, 13, 9, 24), (3, 1, 5, 20, 31, 40)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_pos_output_and_nag_epilogue_match_reference(seed, B, H, n_q, n_k, m_k, D, dtype):
    q, kp, vp, kn, vn = _qkv(B, H, n_q, n_k, m_k, D, dtype)
    # random Z+ and Z- are unrelated, so |Z~|/|Z+| is about sqrt(phi^2 + (phi - 1)^2): row 0 stays under its tau,
    # the last row is clipped
    phi = torch.linspace(1.5, 5.0, B, device=DEVICE)
    tau = torch.linspace(6.0, 1.2, B, device=DEVICE)
    alpha = torch.linspace(1.0, 0.25, B, device=DEVICE)
    clipped, kept = _clipped_tokens(q, kp, vp, kn, vn, phi, tau)
    assert clipped > 0 and kept > 0, "the shapes should exercise both sides of the tau clip"
    out, pos = _nag_fused(q, kp, vp, kn, vn, phi, tau, alpha)
    assert out.dtype == pos.dtype == dtype and out.shape == pos.shape == q.shape
    tol = 3e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(pos.float(), nasa_attention_ref(q, kp, vp, kn, vn, 0.0), rtol=tol, atol=tol,
                               msg=f"seed {seed}")
    ref = nag_attention_ref(q, kp, vp, kn, vn, phi, tau, alpha)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_nag_with_key_lengths_and_plain_combination_unchanged(seed):
    B, H, n_q, n_k, m_k, D = 3, 2, 19, 23, 17, 32
    q, kp, vp, kn, vn = _qkv(B, H, n_q, n_k, m_k, D, torch.float16)
    lp, ln = torch.tensor([23, 5, 11], device=DEVICE), torch.tensor([1, 17, 9], device=DEVICE)
    phi, tau = torch.tensor([2.0, 4.0, 7.0], device=DEVICE), torch.tensor([2.5, 1.5, 3.0], device=DEVICE)
    alpha = torch.tensor([0.5, 1.0, 0.3], device=DEVICE)
    masks = dict(mask_pos=_prefix_mask(lp, n_k), mask_neg=_prefix_mask(ln, m_k))
    out, _ = _nag_fused(q, kp, vp, kn, vn, phi, tau, alpha, len_pos=lp, len_neg=ln)
    ref = nag_attention_ref(q, kp, vp, kn, vn, phi, tau, alpha, **masks)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2, msg=f"seed {seed}")
    # writing Z+ changes nothing in the combined output
    a = torch.tensor([0.0, 0.5, 1.3], device=DEVICE)
    kw = dict(len_pos=lp, len_neg=ln, block_m=16, block_n=16)
    assert torch.equal(na.nasa_attention(q, kp, vp, kn, vn, a, return_pos=True, **kw)[0],
                       na.nasa_attention(q, kp, vp, kn, vn, a, **kw))


def test_nag_renorm_edge_cases():
    # a token whose features are all zero (no key to attend to) stays zero, never 0/0; phi 1 gives back Z+
    pos = torch.randn(2, 3, 5, 4)
    pos[1, :, 2] = 0
    neg = torch.randn(2, 3, 5, 4)
    one, tau, half = torch.ones(2), torch.full((2,), 2.5), torch.full((2,), 0.5)
    out = nag_renorm(pos, one.view(-1, 1, 1, 1) * pos - 0 * neg, tau, half)
    assert torch.isfinite(out).all() and torch.equal(out[1, :, 2], torch.zeros(3, 4))
    torch.testing.assert_close(out, pos, rtol=1e-6, atol=1e-6)
    # past tau the token's L1 norm (over all heads) is exactly tau times Z+'s, with alpha 1
    big = 10 * pos - 9 * neg
    clipped = nag_renorm(pos, big, torch.full((2,), 1.5), torch.ones(2))
    ratio = clipped.abs().sum((1, 3)) / pos.abs().sum((1, 3))
    live = pos.abs().sum((1, 3)) > 0
    torch.testing.assert_close(ratio[live], torch.full_like(ratio[live], 1.5), rtol=1e-5, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_nag_sd_turbo_shape(dtype, seed):
    q, kp, vp, kn, vn = _qkv(2, 5, 1024, 77, 77, 64, dtype, device="cuda")
    phi, tau = torch.tensor([3.0, 5.0], device="cuda"), torch.tensor([2.5, 2.5], device="cuda")
    alpha = torch.tensor([0.5, 0.25], device="cuda")
    out, _ = _nag_fused(q, kp, vp, kn, vn, phi, tau, alpha)
    ref = nag_attention_ref(q, kp, vp, kn, vn, phi, tau, alpha)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 if dtype == torch.float16 else 5e-2,
                               msg=f"seed {seed}")


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
