"""Adapter linear (x W^T + b + s (x A^T) B^T): Triton kernel vs the fp32 reference; the AdapterLinear module.

Without CUDA the kernel runs under the Triton interpreter (see tests/kernels/conftest.py).
"""

import pytest
import torch

from fewstep.kernels.reference import adapter_linear_ref
from tests.kernels.conftest import DEVICE, cuda_only, kernel_module

al = kernel_module("adapter_linear", "_adapter_linear_kernel")


def _operands(S, T, K, N, R, dtype, device=DEVICE, bias=True):
    x = torch.randn(S, T, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    a = (torch.randn(R, K, device=device) / K**0.5).to(dtype)
    bb = (torch.randn(N, R, device=device) / R**0.5).to(dtype)
    s = torch.randn(S, device=device)
    return x, w, b, a, bb, s


@pytest.mark.parametrize("S,T,K,N,R", [(2, 7, 19, 13, 3), (3, 5, 40, 33, 8), (1, 17, 24, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(seed, S, T, K, N, R, dtype, bias):
    x, w, b, a, bb, s = _operands(S, T, K, N, R, dtype, bias=bias)
    y = al.adapter_linear(x, w, b, a, bb, s, block_m=16, block_n=16, block_k=16)
    ref = adapter_linear_ref(x, w, b, a, bb, s.repeat_interleave(T))
    assert y.dtype == dtype and y.shape == (S, T, N)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_plain_linear_and_zero_scale(seed):
    x, w, b, a, bb, s = _operands(2, 6, 20, 12, 4, torch.float32)
    plain = al.adapter_linear(x, w, b, None, None, None, block_m=16, block_n=16, block_k=16)
    zero = al.adapter_linear(x, w, b, a, bb, torch.zeros(2), block_m=16, block_n=16, block_k=16)
    ref = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(zero, ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_bad_arguments():
    x, w, b, a, bb, s = _operands(2, 3, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="a must be"):
        al.adapter_linear(x, w, b, a.t(), bb, s)
    with pytest.raises(ValueError, match="split evenly"):
        al.adapter_linear(x, w, b, a, bb, torch.ones(4))
    with pytest.raises(ValueError, match="rank"):
        al.adapter_linear(x, w, b, torch.zeros(65, 8), torch.zeros(4, 65), s)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,T", [(320, 4096), (640, 1024), (1280, 256)])
def test_gpu_sd_turbo_shapes(dtype, C, T, seed):
    x, w, b, a, bb, s = _operands(2, T, C, C, 16, dtype, device="cuda")
    y = al.adapter_linear(x, w, b, a, bb, s)
    ref = adapter_linear_ref(x, w, b, a, bb, s.repeat_interleave(T))
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2, msg=f"seed {seed}")
