"""Linear layer plus a per-sample-scaled low-rank adapter in one Triton GEMM (inference only).

    y = x W^T + bias + s_row * ((x A^T) B^T)        x: [M, K], W: [N, K], A: [R, K], B: [N, R], R <= 64

This is the projection of an AGD-style guidance adapter (engines/adapters.py): the guidance-scale embedding of
such adapters reduces to one scale per sample, ``s_row = scale[row // rows_per_scale]`` (the tokens of one image
share it). Unfused, torch runs three GEMMs, a scale and two adds with ``[M, R]`` and ``[M, N]`` round trips through
memory. Here one program owns an ``[BLOCK_M, BLOCK_N]`` output tile: its K loop multiplies the x tile it already
holds by both the W tile and the (narrow) A tile, so ``x A^T`` costs no extra x traffic; the epilogue adds
``(s * (x A^T)) B^T``, the bias, and stores once. The low-rank product is recomputed by each N tile of a row
block, an extra ``R / BLOCK_N`` of the main GEMM's FLOPs (R = 16 at BLOCK_N = 128: 12.5%), the price of the single
pass; ``benchmarks/kernels/bench_guidance.py`` measures it against torch.

Inputs fp16/bf16 (fp32 accumulate) or fp32. triton is imported guarded; set ``TRITON_INTERPRET=1`` before
importing this module to run it on CPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "MAX_RANK", "adapter_linear"]

MAX_RANK = 64


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


if HAS_TRITON:

    @triton.jit
    def _adapter_linear_kernel(
        X, W, BIAS, A, BB, S, Y,
        M, N, K, R, rows_per_scale,
        stride_xm, stride_wn, stride_ar, stride_bn, stride_ym,
        HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # grouped tile order: neighbouring programs share W tiles in L2
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * n_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask = offs_m < M
        n_mask = offs_n < N

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        low = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # W^T tile [BLOCK_K, BLOCK_N]
        a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None]  # A^T tile [BLOCK_K, BLOCK_R]
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc)
            if HAS_ADAPTER:
                a = tl.load(a_ptrs, mask=k_mask[:, None] & (offs_r[None, :] < R), other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                low = tl.dot(x, a, low)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            a_ptrs += BLOCK_K

        if HAS_ADAPTER:
            s = tl.load(S + offs_m // rows_per_scale, mask=m_mask, other=0.0).to(tl.float32)
            low = low * s[:, None]
            b = tl.load(BB + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None],
                        mask=(offs_r[:, None] < R) & n_mask[None, :], other=0.0)  # B^T tile [BLOCK_R, BLOCK_N]
            if DOT_FP32:
                acc = tl.dot(low, b.to(tl.float32), acc)
            else:
                # the scaled low-rank activations go through the tensor cores in the input dtype, as torch's
                # unfused fp16 path rounds x A^T to fp16 too
                acc = tl.dot(low.to(b.dtype), b, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _interpreted() -> bool:
    return type(_adapter_linear_kernel).__name__ == "InterpretedFunction"


def adapter_linear(
    x: torch.Tensor,  # x: [..., K]
    weight: torch.Tensor,  # weight: [N, K]
    bias: torch.Tensor | None,  # bias: [N]
    a: torch.Tensor | None,  # a: [R, K]
    b: torch.Tensor | None,  # b: [N, R]
    scale: torch.Tensor | None,  # scale: [S] per sample (or [1]); row i of x uses scale[i // rows_per_scale]
    rows_per_scale: int | None = None,
    *,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 32,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``x W^T + bias + s * ((x A^T) B^T)``, in x's dtype, shape ``[..., N]``. ``a``/``b``/``scale`` None: a plain
    linear through the same kernel. ``rows_per_scale`` defaults to the rows of x divided by ``len(scale)`` (x of
    shape ``[S, tokens, K]`` with one scale per sample)."""
    if not HAS_TRITON:
        raise RuntimeError("adapter_linear needs triton (pip install triton)")
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must be [N, {K}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    has_adapter = a is not None
    if has_adapter:
        if b is None or scale is None:
            raise ValueError("a, b and scale go together")
        R = a.shape[0]
        if a.shape != (R, K) or b.shape != (N, R):
            raise ValueError(f"a must be [R, {K}] and b [{N}, R]; got {tuple(a.shape)} and {tuple(b.shape)}")
        if not 1 <= R <= MAX_RANK:
            raise ValueError(f"rank must be 1..{MAX_RANK}, got {R}")
        scale = scale.reshape(-1).to(device=x.device)
        if rows_per_scale is None:
            if M % scale.numel():
                raise ValueError(f"{M} rows do not split evenly over {scale.numel()} scales")
            rows_per_scale = M // scale.numel()
        if rows_per_scale < 1 or (M and (M - 1) // rows_per_scale >= scale.numel()):
            raise ValueError(f"{scale.numel()} scales do not cover {M} rows at {rows_per_scale} rows each")
        a = a if a.stride(-1) == 1 else a.contiguous()
        b = b if b.stride(-1) == 1 else b.contiguous()
    else:
        R, a, b, scale, rows_per_scale = 0, weight, weight, weight, 1  # placeholders, never read
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    interp = _interpreted()
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _adapter_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, a, b, scale, y,
        M, N, K, R, rows_per_scale,
        x2.stride(0), weight.stride(0), a.stride(0), b.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, HAS_ADAPTER=has_adapter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, _next_pow2(R)),
        GROUP_M=8, DOT_FP32=x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16),
        num_warps=num_warps, num_stages=num_stages,
    )
    return y.reshape(*x.shape[:-1], N)
