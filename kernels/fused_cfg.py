"""Fused classifier-free-guidance combine + sampler update (inference only) in Triton.

With CFG the denoiser runs once on the doubled batch ``[u; c]`` (unconditional rows first) and the torch path then
spends several full-tensor passes: the fp32 upcast, ``u + g (c - u)``, optionally the guidance rescale of Lin et al.
(2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4: match the per-sample std of the
guided prediction to the conditional one, blended by ``phi``), the prediction-type conversion and the sampler step.
Every sampler fewstep runs is affine in (sample, model output, fresh noise) once its schedule is fixed
(``engines/samplers.py::step_coefficients``), so all of it collapses into one elementwise pass::

    guided = u + g_b * (c - u)
    guided = phi * guided * std(c_b) / std(guided_b) + (1 - phi) * guided      (phi > 0 only)
    x_next = a * x + b * guided + n * noise                                     (noise optional)

It reads ``both`` (any float dtype, e.g. the fp16 model output: no separate upcast pass), ``x`` and ``noise`` once
and writes ``x_next`` once, in fp32. ``g`` is a device tensor (0-dim or ``[B]``) so the launch needs no host sync
and can be captured in a CUDA graph. The rescale needs per-sample statistics: a first reduction kernel writes
per-(sample, block) partial sums, the elementwise kernel combines them (two launches when ``phi > 0``, one
otherwise). Standard deviations are unbiased, as in diffusers' ``rescale_noise_cfg``.

triton is imported guarded so ``import fewstep.kernels`` works on CPU-only hosts without it; set
``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU server without triton: callers check HAS_TRITON and use the torch reference
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "fused_cfg_step"]

BLOCK = 1024  # elements per program: a latent row of SD-Turbo (4 x 64 x 64) is 16 programs


if HAS_TRITON:

    @triton.jit
    def _cfg_stats_kernel(
        BOTH, G, STATS,
        n_per_sample, B, stride_g,
        BLOCK_SIZE: tl.constexpr,
    ):
        # per (block, sample): sum and sum of squares of c and of guided, fp32
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_per_sample
        u = tl.load(BOTH + b * n_per_sample + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(BOTH + (b + B) * n_per_sample + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + b * stride_g).to(tl.float32)
        guided = u + g * (c - u)
        base = STATS + (b * tl.num_programs(0) + pid) * 4
        tl.store(base + 0, tl.sum(c, 0))
        tl.store(base + 1, tl.sum(c * c, 0))
        tl.store(base + 2, tl.sum(guided, 0))
        tl.store(base + 3, tl.sum(guided * guided, 0))

    @triton.jit
    def _fused_cfg_kernel(
        BOTH, X, NOISE, OUT, G, STATS,
        n_per_sample, B, stride_g, n_blocks,
        coef_x, coef_out, coef_noise, phi,
        BLOCK_SIZE: tl.constexpr, HAS_NOISE: tl.constexpr, RESCALE: tl.constexpr, STATS_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_per_sample
        row = b * n_per_sample
        u = tl.load(BOTH + row + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(BOTH + B * n_per_sample + row + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + b * stride_g).to(tl.float32)
        guided = u + g * (c - u)
        if RESCALE:
            # every program of a sample re-reduces the (few) partial sums of that sample: no third launch
            s_offs = tl.arange(0, STATS_BLOCK)
            s_mask = s_offs < n_blocks
            s_base = STATS + (b * n_blocks + s_offs) * 4
            sum_c = tl.sum(tl.load(s_base + 0, mask=s_mask, other=0.0), 0)
            sq_c = tl.sum(tl.load(s_base + 1, mask=s_mask, other=0.0), 0)
            sum_g = tl.sum(tl.load(s_base + 2, mask=s_mask, other=0.0), 0)
            sq_g = tl.sum(tl.load(s_base + 3, mask=s_mask, other=0.0), 0)
            n = n_per_sample * 1.0  # fp32 (a scalar int argument may arrive specialised as a constant)
            var_c = tl.maximum(sq_c - sum_c * sum_c / n, 0.0) / (n - 1.0)
            var_g = tl.maximum(sq_g - sum_g * sum_g / n, 0.0) / (n - 1.0)
            factor = tl.sqrt(var_c) / tl.sqrt(var_g)
            guided = phi * (guided * factor) + (1.0 - phi) * guided
        x = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
        res = coef_x * x + coef_out * guided
        if HAS_NOISE:
            nz = tl.load(NOISE + row + offs, mask=mask, other=0.0).to(tl.float32)
            res = res + coef_noise * nz
        tl.store(OUT + row + offs, res, mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def fused_cfg_step(
    both: torch.Tensor,  # both: [2B, ...] model output, unconditional rows first
    x: torch.Tensor,  # x: [B, ...] current sample
    guidance: torch.Tensor | float,  # 0-dim or [B]
    coef_x: float,
    coef_out: float,
    noise: torch.Tensor | None = None,  # noise: [B, ...] or None
    coef_noise: float = 0.0,
    guidance_rescale: float = 0.0,
    *,
    block: int = BLOCK,
) -> torch.Tensor:
    """``coef_x * x + coef_out * cfg(u, c) + coef_noise * noise`` in fp32, ``[B, ...]`` (see the module docstring).

    ``both`` may be fp16/bf16/fp32; ``x`` and ``noise`` any float dtype; all contiguous (made so if not).
    """
    if not HAS_TRITON:
        raise RuntimeError("fused_cfg_step needs triton (pip install triton)")
    if both.shape[0] % 2 or both.shape[0] // 2 != x.shape[0] or both.shape[1:] != x.shape[1:]:
        raise ValueError(f"both must be [2B, ...] for x [B, ...]; got {tuple(both.shape)} and {tuple(x.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    B = x.shape[0]
    n = x[0].numel() if B else 0
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if B == 0 or n == 0:
        return out
    if n * 2 * B >= 2**31:
        raise ValueError("tensor too large for int32 offsets")
    both, x = both.contiguous(), x.contiguous()
    if noise is not None:
        noise = noise.contiguous()
    g = guidance if isinstance(guidance, torch.Tensor) else torch.tensor(float(guidance), device=x.device)
    g = g.to(device=x.device)
    if g.dim() == 0 or g.numel() == 1:
        g, stride_g = g.reshape(1), 0
    elif g.shape == (B,):
        g, stride_g = g.contiguous(), 1
    else:
        raise ValueError(f"guidance must be a scalar or [B={B}], got {tuple(g.shape)}")
    n_blocks = triton.cdiv(n, block)
    grid = (n_blocks, B)
    rescale = guidance_rescale > 0.0
    if rescale:
        if n < 2:
            raise ValueError("guidance rescale needs at least 2 elements per sample")
        stats = torch.empty(B * n_blocks * 4, dtype=torch.float32, device=x.device)
        _cfg_stats_kernel[grid](both, g, stats, n, B, stride_g, BLOCK_SIZE=block)
    else:
        stats = out  # placeholder, never read
    _fused_cfg_kernel[grid](
        both, x, noise if noise is not None else x, out, g, stats,
        n, B, stride_g, n_blocks,
        float(coef_x), float(coef_out), float(coef_noise), float(guidance_rescale),
        BLOCK_SIZE=block, HAS_NOISE=noise is not None, RESCALE=rescale, STATS_BLOCK=max(16, _next_pow2(n_blocks)),
    )
    return out
