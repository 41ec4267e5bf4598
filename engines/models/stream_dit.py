"""StreamDiT: a small video DiT with per-frame noise levels, for moving-buffer streaming.

The model denoises a buffer of frames in which every frame may sit at its own noise level (StreamDiT's moving
buffer: clean-ish frames at the front, fresh noise at the back). Flow matching, as diffusers'
``FlowMatchEulerDiscreteScheduler``: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the network predicts the
velocity ``v = noise - x0`` from ``timestep = sigma * 1000`` (one per frame), and Euler steps
``x <- x + (sigma_next - sigma) * v`` frame by frame.

Architecture (PixArt-like blocks, made per-frame):

* patchify each frame with a ``patch_size`` convolution: ``[B, C, T, H, W] -> [B, T*h*w, D]``, tokens ordered
  (t, row, col), row-major; ``kernels.attention_processor._token_grid`` reads exactly this layout;
* factorised fixed sin-cos positions: a 2-D spatial table (row half, column half of the channels) plus a 1-D
  temporal table over the frame's position in the buffer; no parameter depends on ``max_frames`` or the size;
* per-frame time embedding -> adaLN-single modulation (6 x D per frame, broadcast over that frame's tokens) plus
  a learned per-block table, as in PixArt-alpha;
* self-attention over all tokens of the buffer and cross-attention to the projected text, both diffusers
  ``Attention`` modules running the stock ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``), so
  ``fewstep.kernels.attention_processor.enable_block_sparse_attention`` can swap in the block-sparse kernel;
* final adaLN (shift, scale per frame) + linear back to patches.

Initialisation follows DiT: modulation and output projections start at zero, so a fresh model predicts v = 0.
Random-weight test checkpoints re-randomise those (tests/tiny_models.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["StreamDiTModel", "sincos_positions"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: [N] float -> [N, dim] (sin half, cos half), as in MAE/DiT."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_positions(dim: int, frames: int, h: int, w: int, base: int) -> torch.Tensor:
    """Factorised space-time sin-cos table [frames * h * w, dim] in (t, row, col) order.

    Spatial positions are scaled to the training grid (``base`` patches per side, PixArt's interpolation), so a
    different frame size reuses the same position range; the temporal position is the frame's slot in the buffer.
    """
    rows = torch.arange(h, dtype=torch.float64) * (base / h)
    cols = torch.arange(w, dtype=torch.float64) * (base / w)
    half = dim // 2
    spatial = torch.cat([_sincos_1d(half, rows)[:, None, :].expand(h, w, half),
                         _sincos_1d(half, cols)[None, :, :].expand(h, w, half)], dim=-1)  # [h, w, D]
    temporal = _sincos_1d(dim, torch.arange(frames, dtype=torch.float64))  # [T, D]
    return (temporal[:, None, None, :] + spatial[None]).reshape(frames * h * w, dim)


class StreamDiTBlock(nn.Module):
    """Self-attention over the whole buffer, cross-attention to text, MLP; adaLN-modulated per frame."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=True, out_bias=True,
                               processor=AttnProcessor2_0())
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=eps)
        self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_dim, heads=heads, dim_head=head_dim,
                               bias=True, out_bias=True, processor=AttnProcessor2_0())
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                context_bias: torch.Tensor | None, frames: int) -> torch.Tensor:
        # x: [B, N, D] with N = frames * hw; temb: [B, T, 6, D] (per frame)
        b, n, d = x.shape
        mod = self.scale_shift_table[None, None] + temb  # [B, T, 6, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unsqueeze(2).unbind(dim=3)
        # each [B, T, 1, D]: broadcasts over the frame's hw tokens

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, frames, n // frames, d)

        h = per_frame(self.norm1(x)) * (1 + scale_msa) + shift_msa
        h = self.attn1(h.reshape(b, n, d))
        x = x + (per_frame(h) * gate_msa).reshape(b, n, d)
        x = x + self.attn2(self.norm2(x), encoder_hidden_states=context, attention_mask=context_bias)
        h = per_frame(self.norm3(x)) * (1 + scale_mlp) + shift_mlp
        h = self.ff(h.reshape(b, n, d))
        return x + (per_frame(h) * gate_mlp).reshape(b, n, d)


class StreamDiTModel(ModelMixin, ConfigMixin):
    """Video DiT with per-frame timesteps. See the module docstring for the conventions."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["StreamDiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 4,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 64,
        cross_attention_dim: int | None = None,
        caption_channels: int = 128,
        max_frames: int = 32,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if dim % 4:
            raise ValueError(f"num_attention_heads * attention_head_dim = {dim} must be a multiple of 4 "
                             "(the 2-D sin-cos table splits the channels in four)")
        out_channels = out_channels or in_channels
        cross_dim = cross_attention_dim or dim
        self.inner_dim = dim
        self.out_channels = out_channels
        self.gradient_checkpointing = False

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, dim)
        self.time_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # adaLN-single
        self.caption_projection = nn.Sequential(nn.Linear(caption_channels, cross_dim), nn.GELU(approximate="tanh"),
                                                nn.Linear(cross_dim, cross_dim))
        self.transformer_blocks = nn.ModuleList(
            StreamDiTBlock(dim, num_attention_heads, attention_head_dim, cross_dim, mlp_ratio, norm_eps)
            for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # DiT: zero modulation and zero output, so every block starts as the identity and v starts at 0.
        nn.init.zeros_(self.time_mod[1].weight)
        nn.init.zeros_(self.time_mod[1].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _positions(self, frames: int, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (frames, h, w, str(device), dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            base = self.config.sample_size // self.config.patch_size
            pos = sincos_positions(self.inner_dim, frames, h, w, base).to(device, dtype)
            self._pos_cache = {key: pos}  # one entry: a server runs one buffer shape at a time
        return pos

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        # hidden_states: [B, C, T, H, W]; timestep: [B, T] (sigma * 1000 per frame); text: [B, L, Dt]; mask [B, L]
        cfg = self.config
        b, c, t, hgt, wid = hidden_states.shape
        p = cfg.patch_size
        if t > cfg.max_frames:
            raise ValueError(f"buffer of {t} frames exceeds max_frames={cfg.max_frames}")
        if hgt % p or wid % p:
            raise ValueError(f"frame size {wid}x{hgt} must be a multiple of patch_size={p}")
        if timestep.ndim == 1:  # one level for the whole buffer
            timestep = timestep[:, None].expand(b, t)
        if timestep.shape != (b, t):
            raise ValueError(f"timestep must be [B, T] = [{b}, {t}], got {list(timestep.shape)}")
        h, w = hgt // p, wid // p
        dtype = self.patch_embed.weight.dtype

        x = hidden_states.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * t, c, hgt, wid)
        x = self.patch_embed(x)  # [B*T, D, h, w]
        x = x.flatten(2).transpose(1, 2).reshape(b, t * h * w, self.inner_dim)
        x = x + self._positions(t, h, w, x.device, x.dtype)[None]

        emb = self.time_embed(self.time_proj(timestep.reshape(-1).float()).to(dtype))  # [B*T, D]
        temb = self.time_mod(emb).view(b, t, 6, self.inner_dim)
        emb = emb.view(b, t, self.inner_dim)

        context = self.caption_projection(encoder_hidden_states.to(dtype))
        bias = None
        if encoder_attention_mask is not None:  # [B, L] of 1/0 -> additive bias [B, 1, L]
            bias = (1 - encoder_attention_mask.to(dtype)) * -10000.0
            bias = bias.unsqueeze(1)

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, temb, context, bias, t)
            else:
                x = block(x, temb, context, bias, t)

        shift, scale = (self.scale_shift_table[None, None] + emb[:, :, None]).unsqueeze(2).unbind(dim=3)
        x = self.norm_out(x).view(b, t, h * w, self.inner_dim) * (1 + scale) + shift
        x = self.proj_out(x)  # [B, T, hw, p*p*C]
        x = x.view(b, t, h, w, p, p, self.out_channels)
        out = x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, t, hgt, wid)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

