"""Plain-torch fp32 references for the Triton kernels (correctness oracles, not fast paths)."""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "block_sparse_attention_ref", "expand_block_mask"]


def attention_ref(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k: torch.Tensor,  # k: [B, H, Nk, D]
    v: torch.Tensor,  # v: [B, H, Nk, D]
    scale: float | None = None,
    mask: torch.Tensor | None = None,  # mask: [B, H, Nq, Nk] bool (broadcastable), True = attend
) -> torch.Tensor:
    """Dense softmax attention in fp32; rows whose mask is all False give zeros. Returns fp32."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # s: [B, H, Nq, Nk]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        # softmax of an all -inf row is NaN; such rows attend to nothing
        p = torch.where(mask.any(dim=-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.matmul(p, v.float())


def expand_block_mask(
    block_mask: torch.Tensor,  # block_mask: [B, H, Mq, Mk] bool
    n_q: int,
    n_k: int,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """Block mask -> token mask [B, H, n_q, n_k]."""
    m = block_mask.repeat_interleave(block_m, dim=-2).repeat_interleave(block_n, dim=-1)
    return m[..., :n_q, :n_k]


def block_sparse_attention_ref(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k: torch.Tensor,  # k: [B, H, Nk, D]
    v: torch.Tensor,  # v: [B, H, Nk, D]
    block_mask: torch.Tensor,  # block_mask: [B, H, ceil(Nq/block_m), ceil(Nk/block_n)] bool
    block_m: int,
    block_n: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense fp32 attention with the expanded block mask; rows with no key give zeros."""
    mask = expand_block_mask(block_mask, q.shape[-2], k.shape[-2], block_m, block_n)
    return attention_ref(q, k, v, scale=scale, mask=mask)
