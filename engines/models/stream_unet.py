"""StreamUNet: a per-frame convolutional UNet with attention across the frames of a moving buffer.

Why: the StreamDiT default of 2026-11-29 (359ae9a) (5 x 192, 16x16 tokens per 32-px frame) drew ragged blobs; its own 25-step-equivalent
teacher got 5% of held-out frames right. The image models had the same problem as DiTs and lost it as UNets whose
attention blocks know where they are (``positional_unet``; image teacher 0.16 -> 0.975 strict adherence). This is that
image UNet made into a video denoiser, with the StreamDiT interface the engine's moving buffer calls:

* every frame of ``[B, C, T, H, W]`` goes through the same ``PositionalUNet2DConditionModel`` as one image, with its
  own timestep (the per-frame noise level: ``timestep`` is ``[B, T]``, flattened to the UNet's ``[B*T]``) and the
  stream's text;
* after each spatial attention block, a **frame attention** mixes the frames: at levels with at most
  ``joint_tokens`` cells per frame (8x8 at 32 px) it attends over all ``T*h*w`` cells of the buffer (what StreamDiT
  does at every layer, token order ``(t, row, col)``), at finer levels over the ``T`` frames of each cell (AnimateDiff's
  temporal attention). A fixed sin-cos table of the frame's slot in the buffer enters through a learned linear map,
  and the output projection starts at zero, so a fresh model is the image UNet applied frame by frame.

Conventions are StreamDiT's (``stream_dit.py``): flow matching, ``v = noise - x0`` predicted from
``timestep = sigma * 1000`` per frame, ``max_frames`` in the config for the engine's buffer check.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from .positional_unet import PositionalUNet2DConditionModel, _Positioned
from .stream_dit import _sincos_1d

__all__ = ["StreamUNetModel"]


class FrameAttention(nn.Module):
    """Self-attention across the frames of each buffer, residual, zero-initialised output.

    ``frames`` is set by ``StreamUNetModel.forward`` before each call (the input is ``[B*T, C, h, w]``)."""

    def __init__(self, channels: int, heads: int, joint: bool, max_frames: int):
        super().__init__()
        self.joint, self.max_frames, self.frames = joint, max_frames, 1
        self.norm = nn.LayerNorm(channels)
        self.slot = nn.Linear(channels, channels, bias=False)  # frame-slot table -> this block's channels
        self.attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=True, out_bias=True,
                              processor=AttnProcessor2_0())
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)
        self.register_buffer("table", _sincos_1d(channels, torch.arange(max_frames, dtype=torch.float64)),
                             persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = self.frames
        bt, c, hh, ww = h.shape
        if bt % t:   # called outside StreamUNetModel.forward with another buffer length
            raise ValueError(f"frame attention set for {t} frames got {bt} frames, not a multiple")
        b, n = bt // t, hh * ww
        x = h.view(b, t, c, n).permute(0, 1, 3, 2)                        # [B, T, n, C]
        x = self.norm(x) + self.slot(self.table[:t].to(x.dtype))[None, :, None, :]
        x = x.reshape(b, t * n, c) if self.joint else x.transpose(1, 2).reshape(b * n, t, c)
        x = self.attn(x)
        x = x.view(b, t, n, c) if self.joint else x.view(b, n, t, c).transpose(1, 2)
        return h + x.permute(0, 1, 3, 2).reshape(bt, c, hh, ww)


class _SpaceTime(nn.Module):
    """A positioned spatial attention block (``Transformer2DModel`` call convention) followed by frame attention."""

    def __init__(self, spatial: nn.Module, frames: FrameAttention):
        super().__init__()
        self.spatial, self.frames = spatial, frames

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        out = self.spatial(hidden_states, *args, return_dict=False, **kwargs)[0]
        out = self.frames(out)
        return (out,) if not return_dict else Transformer2DModelOutput(sample=out)


class StreamUNetModel(ModelMixin, ConfigMixin):
    """Video denoiser with per-frame timesteps (see the module docstring)."""

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (32, 64, 128),
                 down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 layers_per_block: int = 1, attention_head_dim: tuple[int, ...] | int = 4,
                 cross_attention_dim: int = 128, norm_num_groups: int = 16, position_features: int = 32,
                 max_frames: int = 16, joint_tokens: int = 64):
        super().__init__()
        self.unet = PositionalUNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=block_out_channels, down_block_types=down_block_types, up_block_types=up_block_types,
            layers_per_block=layers_per_block, attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups,
            position_features=position_features)
        self.frame_attentions: list[FrameAttention] = []
        inner = self.unet.unet
        # the cells per frame at each level: the down path halves the side after every block but the last
        n = len(block_out_channels)
        side = {i: sample_size // 2 ** i for i in range(n)}
        levels = [(blk, i) for i, blk in enumerate(inner.down_blocks)] + [(inner.mid_block, n - 1)] + \
                 [(blk, n - 1 - i) for i, blk in enumerate(inner.up_blocks)]
        for holder, level in levels:
            attns = getattr(holder, "attentions", None)
            if attns is None:
                continue
            for i, blk in enumerate(attns):
                if isinstance(blk, _Positioned):
                    ch = blk.block.config.in_channels
                    heads = blk.block.config.num_attention_heads
                    fa = FrameAttention(ch, heads, side[level] ** 2 <= joint_tokens, max_frames)
                    attns[i] = _SpaceTime(blk, fa)
                    self.frame_attentions.append(fa)

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.unet.conv_out

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        # hidden_states: [B, C, T, H, W]; timestep: [B, T] or [B] (sigma * 1000); text: [B, L, D]; mask [B, L]
        b, c, t, hgt, wid = hidden_states.shape
        if t > self.config.max_frames:
            raise ValueError(f"buffer of {t} frames exceeds max_frames={self.config.max_frames}")
        mult = 2 ** (len(self.config.block_out_channels) - 1)
        if hgt % mult or wid % mult:
            raise ValueError(f"frame size {wid}x{hgt} must be a multiple of {mult} (the UNet's downsampling)")
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, t)
        if timestep.shape != (b, t):
            raise ValueError(f"timestep must be [B, T] = [{b}, {t}], got {list(timestep.shape)}")
        for fa in self.frame_attentions:
            fa.frames = t
        dtype = self.unet.conv_out.weight.dtype
        x = hidden_states.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * t, c, hgt, wid)
        text = encoder_hidden_states.to(dtype).repeat_interleave(t, dim=0)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.repeat_interleave(t, dim=0)
        v = self.unet(x, timestep.reshape(-1), text, encoder_attention_mask=mask, return_dict=False)[0]
        out = v.view(b, t, -1, hgt, wid).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
