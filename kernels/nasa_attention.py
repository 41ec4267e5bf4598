"""Dual cross-attention for NASA (SNOOPI's Negative-Away Steer Attention) in one Triton pass over the queries.

    out = softmax(q K+^T * scale) V+  -  alpha_b * softmax(q K-^T * scale) V-

(Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", arXiv 2412.02687:
the negative prompt's cross-attention output is subtracted from the positive one's inside every cross-attention
layer, so a one-step model can take a negative prompt without CFG's second denoiser pass.)

One program loads a ``[BLOCK_M, D]`` query tile once and runs two online softmaxes over it: the positive and the
negative key sets (77 text tokens each for CLIP, up to 120/300 for T5), with fp32 statistics and accumulators.
Unfused, the same math is two SDPA calls reading q twice, a scaled subtract and a third output round trip.
``alpha`` is per sample (``[B]``), so rows without a negative prompt (alpha 0) can share the batch: their output
is the positive attention minus exactly zero. Key padding masks are given as per-sample key counts (right-padded
text tokens, as diffusers' tokenizers pad); the attention processor falls back to the torch path for any other mask.

The score/softmax tile code is ``block_sparse_attention._attend_tile`` (same online softmax, same exp2 domain).
triton is imported guarded; set ``TRITON_INTERPRET=1`` before importing to run it on CPU.
"""

from __future__ import annotations

import math

import torch

from .block_sparse_attention import HAS_TRITON, SUPPORTED_DTYPES, _padded_head_dim, is_supported_head_dim

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .block_sparse_attention import _attend_tile

__all__ = ["HAS_TRITON", "SUPPORTED_DTYPES", "nasa_attention"]


if HAS_TRITON:

    @triton.jit
    def _softmax_pass(
        q, k_base, v_base, stride_kn, stride_vn, n_k, qk_scale, offs_n, offs_d,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # text keys are few (77..300): every tile goes through the masked path
        for start_n in range(0, n_k, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                start_n, n_k, qk_scale, offs_n, offs_d,
                HEAD_DIM, BLOCK_D, True, DOT_FP32,
            )
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # no key: zeros
        return acc / l_safe[:, None]

    @triton.jit
    def _nasa_attention_kernel(
        Q, KP, VP, KN, VN, O, P, ALPHA, LEN_P, LEN_N,
        stride_qb, stride_qh, stride_qn,
        stride_kpb, stride_kph, stride_kpn,
        stride_vpb, stride_vph, stride_vpn,
        stride_knb, stride_knh, stride_knn,
        stride_vnb, stride_vnh, stride_vnn,
        stride_ob, stride_oh, stride_on,
        stride_pb, stride_ph, stride_pn,
        stride_alpha, N_Q, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, STORE_POS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)

        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        n_pos = tl.load(LEN_P + off_b)
        n_neg = tl.load(LEN_N + off_b)
        alpha = tl.load(ALPHA + off_b * stride_alpha).to(tl.float32)

        pos = _softmax_pass(
            q, KP + off_b * stride_kpb + off_h * stride_kph, VP + off_b * stride_vpb + off_h * stride_vph,
            stride_kpn, stride_vpn, n_pos, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32,
        )
        neg = _softmax_pass(
            q, KN + off_b * stride_knb + off_h * stride_knh, VN + off_b * stride_vnb + off_h * stride_vnh,
            stride_knn, stride_vnn, n_neg, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_FP32,
        )
        out = (pos - alpha * neg).to(O.dtype.element_ty)
        io_mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
        o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, out, mask=io_mask)
        if STORE_POS:  # NAG's renormalisation needs Z+ beside the combination (a per-token epilogue over all heads)
            p_ptrs = P + off_b * stride_pb + off_h * stride_ph + offs_m[:, None] * stride_pn + offs_d[None, :]
            tl.store(p_ptrs, pos.to(P.dtype.element_ty), mask=io_mask)


def _interpreted() -> bool:
    return type(_nasa_attention_kernel).__name__ == "InterpretedFunction"


def _lengths(lengths: torch.Tensor | None, B: int, n: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((B,), n, dtype=torch.int32, device=device)
    lengths = lengths.to(device=device, dtype=torch.int32).reshape(-1).expand(B).contiguous()
    return lengths.clamp(0, n)


def nasa_attention(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k_pos: torch.Tensor,  # k_pos: [B, H, Nk, D]
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,  # k_neg: [B, H, Mk, D]
    v_neg: torch.Tensor,
    alpha: torch.Tensor | float,  # 0-dim or [B]
    *,
    len_pos: torch.Tensor | None = None,  # [B] valid (leading) keys of each sample; None: all
    len_neg: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    return_pos: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``attn(q, K+, V+) - alpha * attn(q, K-, V-)`` in q's dtype and memory layout (fp16 / bf16; any strides with a
    contiguous last dim, so ``[B, N, H, D]`` buffers pass as ``.transpose(1, 2)`` views). ``return_pos``: also
    ``attn(q, K+, V+)`` itself, as a second tensor (for NAG's renormalisation, ``nasa_processor.nag_renorm``)."""
    if not HAS_TRITON:
        raise RuntimeError("nasa_attention needs triton (pip install triton)")
    if any(t.dim() != 4 for t in (q, k_pos, v_pos, k_neg, v_neg)):
        raise ValueError("q, k, v must be [B, H, N, D]")
    B, H, n_q, D = q.shape
    for name, k, v in (("pos", k_pos, v_pos), ("neg", k_neg, v_neg)):
        if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
            raise ValueError(f"{name} keys/values {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    dtypes = {t.dtype for t in (q, k_pos, v_pos, k_neg, v_neg)}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must all be fp16 or bf16, got {sorted(map(str, dtypes))}")
    if not is_supported_head_dim(D):
        raise ValueError(f"head dim {D} unsupported")
    q, k_pos, v_pos, k_neg, v_neg = (t if t.stride(-1) == 1 else t.contiguous()
                                     for t in (q, k_pos, v_pos, k_neg, v_neg))
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha), device=q.device)
    a = a.to(device=q.device, dtype=torch.float32)
    if a.numel() == 1:
        a, stride_a = a.reshape(1), 0
    elif a.shape == (B,):
        a, stride_a = a.contiguous(), 1
    else:
        raise ValueError(f"alpha must be a scalar or [B={B}], got {tuple(a.shape)}")
    lp = _lengths(len_pos, B, k_pos.shape[2], q.device)
    ln = _lengths(len_neg, B, k_neg.shape[2], q.device)
    out = torch.empty_like(q)
    pos = torch.empty_like(q) if return_pos else out  # unused (never written) without return_pos
    if n_q == 0:
        return (out, pos) if return_pos else out
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    grid = (triton.cdiv(n_q, block_m), H, B)
    _nasa_attention_kernel[grid](
        q, k_pos, v_pos, k_neg, v_neg, out, pos, a, lp, ln,
        q.stride(0), q.stride(1), q.stride(2),
        k_pos.stride(0), k_pos.stride(1), k_pos.stride(2),
        v_pos.stride(0), v_pos.stride(1), v_pos.stride(2),
        k_neg.stride(0), k_neg.stride(1), k_neg.stride(2),
        v_neg.stride(0), v_neg.stride(1), v_neg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0), pos.stride(1), pos.stride(2),
        stride_a, n_q, float(scale) * 1.4426950408889634,
        HEAD_DIM=D, BLOCK_D=_padded_head_dim(D), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=q.dtype == torch.bfloat16 and _interpreted(), STORE_POS=return_pos,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, pos) if return_pos else out
