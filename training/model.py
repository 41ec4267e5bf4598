"""The default fewstep model: word-level tokenizer + tiny CLIP text encoder + pixel-space PixArt DiT.

Flow matching (the convention of diffusers' FlowMatchEulerDiscreteScheduler):
``x_sigma = (1 - sigma) * x0 + sigma * noise``; the network predicts ``v = noise - x0`` given
``timestep = sigma * 1000``; Euler: ``x <- x + (sigma_next - sigma) * v``. Pixels are in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class ModelConfig:
    # text encoder (CLIPTextModel)
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_ff: int = 512
    max_length: int = 32
    # denoiser: "dit" = PixArtTransformer2DModel (dim/heads/layers/patch), "unet" = UNet2DConditionModel
    # (channels/level_heads/unet_layers/attn_levels)
    arch: str = "dit"
    dim: int = 256
    heads: int = 4
    layers: int = 4
    patch: int = 4
    size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)     # block_out_channels, one per resolution level
    level_heads: tuple[int, ...] = (1, 2, 4)      # attention heads per level (diffusers' attention_head_dim)
    unet_layers: int = 1                          # resnets per down block (up blocks have one more)
    attn_levels: int = 2                          # the lowest-resolution levels get self+cross attention
    pos_embed: bool = False                       # UNet: 2-D positions into every attention block (see below)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict:
        # JSON-native (lists, not tuples): checkpoints compare it with the config they stored
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        # JSON (checkpoint state, logs) stores tuples as lists
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                      if k in cls.__dataclass_fields__})


#: named presets; "tiny"/"tiny_unet"/"tiny_unetp" are for CPU tests (seconds). "unet4p" is the default teacher/student
#: since 2026-11-30, ebb3bbb (25-step teacher 0.975 held-out strict adherence; unet4 without positions 0.59); "unet"
#: was the seventh's (0.55, shapes 0.96; deep8, the DiT default before it: 0.16, shapes 0.20). The DiTs stay for
#: comparison: deep8 trained the 2026-11-29 DiT of 359ae9a, p2n the one of 6d95e66, "base" the first H200 run's.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(text_hidden=32, text_layers=1, text_heads=2, text_ff=64,
                        dim=32, heads=2, layers=1, patch=8),
    "base": ModelConfig(),
    # alternatives measured on the GPU (all <= 6M params incl. the text encoder)
    "deep": ModelConfig(dim=192, heads=3, layers=7),
    "p2": ModelConfig(patch=2),
    # twice the depth of base at 3/4 width, same tokens (patch 4): 1.12x base FLOPs, 5.75M params
    "deep8": ModelConfig(dim=192, heads=3, layers=8),
    # patch 2 (32x32 tokens: a small shape spans ~5x5 tokens) at half width, 8 layers: 1.94x base
    # FLOPs, 2.91M params (5.8 MB fp16)
    "p2n": ModelConfig(dim=128, heads=2, layers=8, patch=2),
    # convolutional: 64/32/16 px levels at 32/64/128 channels, self+cross attention at 32 and 16 px (seventh
    # session): 4.22M + 0.61M params, 4.1 GFLOP forward (1.85x deep8). Why: every DiT so far drew ragged blobs
    # whose outlines follow the 4x4 patch grid; convolutions draw local outlines by construction.
    "unet": ModelConfig(arch="unet"),
    # 2026-11-30: a fourth level at 8 px, attention at 16 and 8 px instead of 32 and 16 (unet4p adds positions).
    # Teacher at batch 512: 0.594 held-out strict adherence (unet: 0.549), count 0.91 (0.82), shapes 0.96; relations
    # did not improve (positions 0.62-0.65), so the receptive field was not their cause. 5.14M + 0.61M params
    # (11.5 MB fp16), 3.4 GFLOP forward.
    "unet4": ModelConfig(arch="unet", channels=(32, 64, 128, 96), level_heads=(1, 2, 4, 3)),
    # the default since 2026-11-30 (ebb3bbb): unet / unet4 + a fixed 2-D sin-cos position table into every attention
    # block through a zero-initialised 1x1 convolution (fewstep.engines.models.PositionalUNet2DConditionModel). Why:
    # unet4 did not fix relations (positions 0.62-0.65, as unet's 0.62), so the receptive field was not the cause;
    # the DiT, with positions in every token, got them right (0.92). Result (teacher, 25 steps, batch 512, 8 min):
    # unet4p 0.975 held-out strict adherence, positions 1.00 (unet4: 0.594, 0.65); unetp 0.881, positions 0.98.
    # +23k params (unetp), +25k (unet4p).
    "unetp": ModelConfig(arch="unet", pos_embed=True),
    "unet4p": ModelConfig(arch="unet", channels=(32, 64, 128, 96), level_heads=(1, 2, 4, 3), pos_embed=True),
    "tiny_unetp": ModelConfig(text_hidden=32, text_layers=1, text_heads=2, text_ff=64, arch="unet",
                              channels=(16, 32), level_heads=(1, 2), attn_levels=1, pos_embed=True),
    "tiny_unet": ModelConfig(text_hidden=32, text_layers=1, text_heads=2, text_ff=64, arch="unet",
                             channels=(16, 32), level_heads=(1, 2), attn_levels=1),
}
DEFAULT_PRESET = "unet4p"


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def build_tokenizer(words: list[str] | None = None, max_length: int = 32):
    """Word-level tokenizer over ``training.data.vocabulary()`` wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        from fewstep.training import data
        words = data.vocabulary()
    words = sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=max_length, padding_side="right",
        truncation_side="right")
    assert fast.pad_token_id == PAD_ID and fast.bos_token_id == BOS_ID and fast.eos_token_id == EOS_ID
    return fast


def tokenize(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly the serving call: pad to ``model_max_length``; returns (input_ids, attention_mask)."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if device is not None:
        if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU queue
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return ids, mask


def fast_tokenize(captions: list[str], vocab: dict[str, int], max_length: int):
    """Pure-Python equivalent of :func:`tokenize` for this word-level tokenizer (lower-case,
    whitespace split, <bos> ... <eos>, right truncation keeping <eos>, right padding) -> numpy
    (ids int64 [B, L], mask int64 [B, L]). Used by data workers; equality with the real tokenizer
    is asserted by the tests and on the first batch of every run."""
    ids = np.zeros((len(captions), max_length), dtype=np.int64)
    mask = np.zeros((len(captions), max_length), dtype=np.int64)
    for i, c in enumerate(captions):
        toks = [vocab.get(w, UNK_ID) for w in c.lower().split()][: max_length - 2]
        row = [BOS_ID, *toks, EOS_ID]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def required_max_length(prompt_lists: list[list[str]], floor: int = 32) -> int:
    longest = max((len(p.split()) for lst in prompt_lists for p in lst), default=0)
    need = longest + 2
    return max(floor, int(math.ceil(need / 8) * 8))


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

def build_text_encoder(cfg: ModelConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    tcfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_ff,
        projection_dim=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
        hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return CLIPTextModel(tcfg)


def build_denoiser(cfg: ModelConfig):
    return build_unet(cfg) if cfg.arch == "unet" else build_transformer(cfg)


def unet_block_types(levels: int, attn_levels: int) -> dict[str, tuple[str, ...]]:
    """diffusers block types of a UNet whose ``attn_levels`` lowest-resolution levels have self+cross attention."""
    n, k = levels, attn_levels
    return {"down_block_types": ("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k,
            "up_block_types": ("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k)}


def build_unet(cfg: ModelConfig):
    """A small pixel-space UNet2DConditionModel (no VAE): the engine serves it on its "sd" path, i.e. the text
    encoder runs without a padding mask and the cross-attention sees all ``max_length`` positions."""
    from diffusers import UNet2DConditionModel

    from fewstep.engines.models import PositionalUNet2DConditionModel

    n, k = len(cfg.channels), cfg.attn_levels
    cls = PositionalUNet2DConditionModel if cfg.pos_embed else UNet2DConditionModel
    m = cls(
        sample_size=cfg.size, in_channels=3, out_channels=3, block_out_channels=tuple(cfg.channels),
        **unet_block_types(n, k),
        layers_per_block=cfg.unet_layers, attention_head_dim=tuple(cfg.level_heads),
        cross_attention_dim=cfg.text_hidden, norm_num_groups=min(16, min(cfg.channels)))
    with torch.no_grad():  # start as v = 0, as the DiT does (zero output projection)
        nn.init.zeros_(m.conv_out.weight)
        nn.init.zeros_(m.conv_out.bias)
    return m


def build_transformer(cfg: ModelConfig):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=3,
        out_channels=3, num_layers=cfg.layers, sample_size=cfg.size, patch_size=cfg.patch,
        norm_type="ada_norm_single", caption_channels=cfg.text_hidden,
        cross_attention_dim=cfg.dim, use_additional_conditions=False, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
        norm_eps=1e-6)
    init_transformer_(m)
    return m


@torch.no_grad()
def init_transformer_(m: nn.Module) -> None:
    """DiT/PixArt-style init: xavier linears, zero biases, small timestep MLP, zero-init output
    projection and cross-attention outputs (the network starts as v = 0)."""
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    pe = m.pos_embed.proj
    w = pe.weight.view(pe.weight.shape[0], -1)
    nn.init.xavier_uniform_(w)
    nn.init.zeros_(pe.bias)
    te = m.adaln_single.emb.timestep_embedder
    nn.init.normal_(te.linear_1.weight, std=0.02)
    nn.init.normal_(te.linear_2.weight, std=0.02)
    nn.init.normal_(m.adaln_single.linear.weight, std=0.02)
    cp = m.caption_projection
    nn.init.normal_(cp.linear_1.weight, std=0.02)
    nn.init.normal_(cp.linear_2.weight, std=0.02)
    for blk in m.transformer_blocks:
        nn.init.zeros_(blk.attn2.to_out[0].weight)
    nn.init.zeros_(m.proj_out.weight)
    nn.init.zeros_(m.proj_out.bias)


#: denoiser classes served on the engine's "sd" path (text encoder without a padding mask, no encoder mask)
UNET_CLASSES = ("UNet2DConditionModel", "PositionalUNet2DConditionModel")


class FewstepModel(nn.Module):
    """text encoder + denoiser; ``forward(x, sigma, ids, mask) -> velocity``.

    ``transformer`` holds the denoiser whatever its kind (the attribute name keeps checkpoints of the DiT runs
    loadable); ``denoiser_name`` is its component name in the export ("transformer" or "unet")."""

    def __init__(self, text_encoder: nn.Module, transformer: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.is_unet = type(transformer).__name__ in UNET_CLASSES

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.is_unet else "transformer"

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # the engine's "sd" path (UNets) runs CLIP without a padding mask, as Stable Diffusion does
        return self.text_encoder(input_ids=ids, attention_mask=None if self.is_unet else mask).last_hidden_state

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        t = (sigma.reshape(-1).to(torch.float32) * 1000.0).expand(x.shape[0])
        if self.is_unet:  # exactly the engine's call: no encoder mask
            return self.transformer(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        return self.transformer(hidden_states=x, encoder_hidden_states=emb, encoder_attention_mask=mask,
                                timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                return_dict=False)[0]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma, self.encode(ids, mask), mask)


def build_model(cfg: ModelConfig, vocab_size: int) -> FewstepModel:
    return FewstepModel(build_text_encoder(cfg, vocab_size), build_denoiser(cfg))


# ----------------------------------------------------------------------------------------------
# Sampling (minimal; the serving engine samples the same format through its own path)
# ----------------------------------------------------------------------------------------------

def served_sigmas(model_dir, steps: int) -> list[float]:
    """The sigmas the engine walks for the export in ``model_dir`` at ``steps`` steps, terminal 0 included:
    its own scheduler config and its ``fewstep.flow_sigmas`` hint, through the engine's ``make_schedule``
    (exports say "uniform": linspace(1, 0, N + 1), so a 2-step student really takes two steps)."""
    import json
    from pathlib import Path

    from fewstep.engines.samplers import make_schedule

    d = Path(model_dir)
    index = json.loads((d / "model_index.json").read_text())
    sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    hint = index.get("fewstep", {}).get("flow_sigmas", "scheduler")
    # max_steps: a teacher's 25 steps are beyond what the engine serves, on the same rule
    return make_schedule(index["scheduler"][1], sched_cfg, steps, index.get("_class_name", ""),
                         flow_sigmas=hint, max_steps=max(steps, 1)).sigmas


def uniform_sigmas(steps: int) -> list[float]:
    """linspace(1, 0, N + 1): what ``served_sigmas`` gives for our exports (flow_sigmas "uniform"), for models
    that exist only in memory (the distill stage's student checks)."""
    return [1.0 - i / steps for i in range(steps)] + [0.0]


def scheduler_sigmas(steps: int) -> list[float]:
    """The sigmas FlowMatchEulerDiscreteScheduler(shift=1).set_timesteps(steps) walks through,
    terminal 0 included. NB diffusers 0.42: linspace(1, 1/1000, N) then 0 (for N=2: 1, 0.001, 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(steps)
    return [float(v) for v in s.sigmas]


def guided_velocity(denoise, x: torch.Tensor, sigma: torch.Tensor, emb2: torch.Tensor, mask2: torch.Tensor,
                    guidance: float) -> torch.Tensor:
    """Classifier-free guidance in one batched call: ``emb2``/``mask2`` hold the prompts' embeddings, then the
    unconditional ones; returns ``v_uncond + guidance * (v_cond - v_uncond)`` in float32."""
    B = x.shape[0]
    v = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), emb2, mask2).float()
    vc, vu = v[:B], v[B:]
    return vu + guidance * (vc - vu)


@torch.no_grad()
def sample(model: FewstepModel, ids: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
           sigmas: list[float], guidance: float = 0.0, uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
           autocast_dtype: torch.dtype | None = None, denoise=None) -> torch.Tensor:
    """Euler sampling along ``sigmas`` from ``noise`` (== x at sigmas[0]). Classifier-free guidance
    when ``guidance > 1`` (``uncond`` = tokenised empty prompt, [1, L] or [B, L]). ``denoise``
    overrides ``model.denoise`` (e.g. a compiled version of it)."""
    denoise = denoise or model.denoise
    x = noise.float()
    B = x.shape[0]
    dev = x.device
    use_cfg = guidance > 1.0
    wdtype = next(model.transformer.parameters()).dtype
    ac = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
          else torch.autocast(dev.type, enabled=False))
    with ac:
        emb = model.encode(ids, mask)
        if use_cfg:
            assert uncond is not None
            u_ids, u_mask = (t.expand(B, -1) if t.shape[0] == 1 else t for t in uncond)
            u_emb = model.encode(u_ids, u_mask)
            emb2 = torch.cat([emb, u_emb])
            mask2 = torch.cat([mask, u_mask])
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            xin = x.to(wdtype) if autocast_dtype is None else x
            sig = torch.full((B,), s, device=dev)
            if use_cfg:
                v = guided_velocity(denoise, xin, sig, emb2, mask2, guidance)
            else:
                v = denoise(xin, sig, emb, mask).float()
            x = x + (s_next - s) * v
    return x


def to_uint8_list(x: torch.Tensor) -> list[np.ndarray]:
    """[B,3,H,W] in [-1,1] -> list of HxWx3 uint8 arrays."""
    u = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return list(u.permute(0, 2, 3, 1).cpu().numpy())
