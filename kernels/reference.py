"""Plain-torch fp32 references for the Triton kernels (correctness oracles, not fast paths)."""

from __future__ import annotations

import math

import torch

__all__ = [
    "adapter_linear_ref",
    "attention_ref",
    "block_sparse_attention_ref",
    "cfg_combine_ref",
    "expand_block_mask",
    "fused_cfg_step_ref",
    "nag_attention_ref",
    "nasa_attention_ref",
]


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


def cfg_combine_ref(
    u: torch.Tensor,  # u: [B, ...] unconditional prediction
    c: torch.Tensor,  # c: [B, ...] conditional prediction
    guidance: torch.Tensor | float,  # 0-dim or [B]
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """``u + g (c - u)`` in fp32, then Lin et al.'s rescale (diffusers' ``rescale_noise_cfg``) when phi > 0."""
    u, c = u.float(), c.float()
    g = torch.as_tensor(guidance, dtype=torch.float32, device=u.device)
    if g.dim() == 1:
        g = g.view(-1, *([1] * (u.dim() - 1)))
    guided = u + g * (c - u)
    if guidance_rescale > 0:
        dims = list(range(1, u.dim()))
        std_c = c.std(dim=dims, keepdim=True)
        std_g = guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * (guided * (std_c / std_g)) + (1 - guidance_rescale) * guided
    return guided


def fused_cfg_step_ref(
    both: torch.Tensor,  # both: [2B, ...] unconditional rows first
    x: torch.Tensor,  # x: [B, ...]
    guidance: torch.Tensor | float,
    coef_x: float,
    coef_out: float,
    noise: torch.Tensor | None = None,
    coef_noise: float = 0.0,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """``coef_x x + coef_out cfg(u, c) + coef_noise noise`` in fp32 (the oracle of ``fused_cfg.fused_cfg_step``)."""
    u, c = both.chunk(2)
    out = coef_x * x.float() + coef_out * cfg_combine_ref(u, c, guidance, guidance_rescale)
    if noise is not None:
        out = out + coef_noise * noise.float()
    return out


def adapter_linear_ref(
    x: torch.Tensor,  # x: [M, K] (or [..., K])
    weight: torch.Tensor,  # weight: [N, K]
    bias: torch.Tensor | None,  # bias: [N]
    a: torch.Tensor,  # a: [R, K]
    b: torch.Tensor,  # b: [N, R]
    scale: torch.Tensor | float,  # per row of x ([M]) or a scalar
) -> torch.Tensor:
    """``x W^T + bias + s * ((x A^T) B^T)`` in fp32."""
    xf = x.float()
    y = xf @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    low = (xf @ a.float().t()) @ b.float().t()
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.dim() >= 1 and s.numel() > 1:
        s = s.reshape(*x.shape[:-1], 1)
    return y + s * low


def nasa_attention_ref(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k_pos: torch.Tensor,  # k_pos: [B, H, Nk, D]
    v_pos: torch.Tensor,  # v_pos: [B, H, Nk, D]
    k_neg: torch.Tensor,  # k_neg: [B, H, Mk, D]
    v_neg: torch.Tensor,  # v_neg: [B, H, Mk, D]
    alpha: torch.Tensor | float,  # 0-dim or [B]: the NASA scale per sample
    scale: float | None = None,
    mask_pos: torch.Tensor | None = None,  # mask_pos: [B, 1, 1, Nk] bool (True = attend)
    mask_neg: torch.Tensor | None = None,  # mask_neg: [B, 1, 1, Mk] bool
) -> torch.Tensor:
    """SNOOPI's Negative-Away Steer Attention in fp32: ``attn(q, K+, V+) - alpha * attn(q, K-, V-)``."""
    pos = attention_ref(q, k_pos, v_pos, scale=scale, mask=mask_pos)
    neg = attention_ref(q, k_neg, v_neg, scale=scale, mask=mask_neg)
    a = torch.as_tensor(alpha, dtype=torch.float32, device=q.device)
    if a.dim() == 1:
        a = a.view(-1, 1, 1, 1)
    return pos - a * neg


def nag_attention_ref(
    q: torch.Tensor,  # q: [B, H, Nq, D]
    k_pos: torch.Tensor,  # k_pos: [B, H, Nk, D]
    v_pos: torch.Tensor,  # v_pos: [B, H, Nk, D]
    k_neg: torch.Tensor,  # k_neg: [B, H, Mk, D]
    v_neg: torch.Tensor,  # v_neg: [B, H, Mk, D]
    nag_scale: torch.Tensor | float,  # 0-dim or [B]: phi (1 = no guidance)
    nag_tau: torch.Tensor | float,  # 0-dim or [B]: the L1-norm ratio ceiling
    nag_alpha: torch.Tensor | float,  # 0-dim or [B]: the blend weight of the guided features
    scale: float | None = None,
    mask_pos: torch.Tensor | None = None,  # mask_pos: [B, 1, 1, Nk] bool (True = attend)
    mask_neg: torch.Tensor | None = None,  # mask_neg: [B, 1, 1, Mk] bool
) -> torch.Tensor:
    """Normalized Attention Guidance (Chen et al., arXiv 2505.21179) in fp32, written out step by step::

        Z~ = phi Z+ - (phi - 1) Z-              (extrapolation away from the negative features)
        r  = |Z~|_1 / |Z+|_1                    (per image and query token, over all heads' channels)
        Z^ = Z~ min(r, tau) / r                 (the guided features' L1 norm clipped at tau times Z+'s)
        Z  = alpha Z^ + (1 - alpha) Z+

    A token whose norm ratio is at most tau keeps Z~ as it is (also when |Z+|_1 is 0 and so is |Z~|_1)."""
    pos = attention_ref(q, k_pos, v_pos, scale=scale, mask=mask_pos)
    neg = attention_ref(q, k_neg, v_neg, scale=scale, mask=mask_neg)

    def per_row(x):
        t = torch.as_tensor(x, dtype=torch.float32, device=q.device)
        return t.view(-1, 1, 1, 1) if t.dim() == 1 else t

    phi, tau, alpha = per_row(nag_scale), per_row(nag_tau), per_row(nag_alpha)
    guided = phi * pos - (phi - 1) * neg
    # the per-token L1 norms over every head's channels: [B, 1, Nq, 1]
    n_pos = pos.abs().sum(dim=(1, 3), keepdim=True)
    n_guided = guided.abs().sum(dim=(1, 3), keepdim=True)
    clipped = torch.empty_like(guided)
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            t = tau if tau.dim() == 0 else tau[b, 0, 0, 0]
            if n_guided[b, 0, i, 0] > t * n_pos[b, 0, i, 0]:
                clipped[b, :, i] = guided[b, :, i] * (t * n_pos[b, 0, i, 0] / n_guided[b, 0, i, 0])
            else:
                clipped[b, :, i] = guided[b, :, i]
    return alpha * clipped + (1 - alpha) * pos
