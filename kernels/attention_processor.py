"""Block-sparse self-attention for diffusers DiTs without forking model code.

``enable_block_sparse_attention(model, cfg)`` swaps the processor of every self-attention module
whose processor is the stock ``AttnProcessor2_0`` (PixArt, DiT, ... ``attn1``) or
``WanAttnProcessor`` (Wan 2.x ``attn1``) for a :class:`BlockSparseAttnProcessor`; cross-attention
keeps its processor. The replacement computes q/k/v exactly like the stock processor (norms, Wan
rotary embedding), builds an adaptive block mask from them (``block_sparse_mask.build_block_mask``)
and runs the Triton kernel. Anything the kernel cannot take (CPU, fp32, unsupported head dim, no
triton, an attention mask, cross-attention) goes to the stock processor, so that path is
bit-identical to dense; each reason is logged once on the ``fewstep.kernels`` logger.

``backend="reference"`` (an argument of ``enable_block_sparse_attention`` / the processor, deliberately
not a :class:`BlockSparseConfig` field, so the engine's ``attention`` option can never select it)
replaces the Triton kernel by the fp32 torch oracle of ``reference.py``: same adaptive mask
(``build_block_mask``), same 3-D tiling, attention computed densely with the expanded block mask and
cast back to the input dtype. It runs on any device and dtype (CPU fp32 included), materialises the
``[B, H, N, N]`` score matrix and is slow: it exists for quality studies on CPU
(``benchmarks/kernels/quality_block_sparse.py``), never for serving, and says so in a warning.

Engine option syntax (:meth:`BlockSparseConfig.parse`)::

    attention: dense
    attention: block_sparse(threshold=0.9,topk=none,block=128,local=1,sinks=0,tile_3d=4x4x8)
    attention: block_sparse(mode=static,window=3x3x3,block=128,tile_3d=4x4x8)
    attention: block_sparse(mode=static,window=3x3x3,block=64,tile_3d=2x4x8,table=/path/layers.json)

``mode=static`` is Sliding Tile Attention (STA, arXiv 2502.04507): with ``tile_3d`` on, a query tile
attends the key tiles inside ``window`` (tiles along t, h, w; centred, shifted inward at the grid's
edges) plus the forced blocks (diagonal +- ``local``, ``sinks``). No scores are estimated: the mask
depends only on the token grid, is built once per grid and cached (no host sync inside a step).

``table`` names a JSON file that sets the attention per self-attention layer ("chosen per layer from
a measured table"): ``{"layers": {"<module name or index>": "dense" | "static(3x3x1)" |
"adaptive(0.9)" | "block_sparse(...)"}}``; ``static(...)``/``adaptive(...)`` take the option's other
fields, layers not in the table take the option itself, and an unknown layer is an error that lists
the valid names (:func:`self_attention_layers`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import torch
import torch.nn.functional as F

from .block_sparse_mask import build_block_mask, static_tile_mask, tile_3d_permutation

__all__ = [
    "BACKENDS",
    "BlockSparseAttnProcessor",
    "BlockSparseConfig",
    "block_sparse_processors",
    "disable_block_sparse_attention",
    "enable_block_sparse_attention",
    "layer_config",
    "load_layer_table",
    "self_attention_layers",
]

logger = logging.getLogger("fewstep.kernels")
_logged_reasons: set[str] = set()
_HOOK_ATTR = "_fewstep_block_sparse_hook"


def _log_once(reason: str, level: int = logging.WARNING) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.log(level, "block-sparse attention falls back to dense SDPA: %s", reason)


#: attention backends of :class:`BlockSparseAttnProcessor`: the Triton kernel (serving) and the fp32
#: torch reference (quality studies on any device; see the module docstring).
BACKENDS = ("triton", "reference")
_REFERENCE_NOTICE = (
    "block-sparse attention runs on the fp32 torch REFERENCE backend (device %s): the adaptive block mask "
    "is applied exactly, but attention is computed densely with the expanded mask (O(N^2) memory, slow). "
    "For quality studies only, not a serving path."
)
# elements of one fp32 [b, H, Nq, Nk] score matrix chunk in the reference backend (~128 MB)
_REFERENCE_CHUNK_ELEMS = 1 << 25


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
    """Adaptive block-sparse attention settings (see ``build_block_mask`` for the selection rule).

    threshold: keep per query block the top key blocks holding this much estimated softmax mass
        (None: off; >= 1.0: keep all blocks, i.e. dense through the kernel).
    topk: also keep this many top-scoring key blocks per query block (None: off).
    block: query and key block size in tokens (power of two, 16..256).
    local: key blocks kept on each side of the diagonal. sinks: first key blocks always kept.
    tile_3d: (tt, th, tw) space-time tile; tokens are regrouped into these cubes before blocking
        (needs the token grid, recorded by the hook that ``enable_block_sparse_attention`` installs).
    min_seq_len: shorter sequences run dense.
    mode: "adaptive" (the ASA estimate above) or "static" (STA: the fixed tile window ``window``,
        needs ``tile_3d``; threshold and topk are not used).
    window: (wt, wh, ww) key tiles around each query tile, for mode "static".
    table: path of a per-layer JSON table (module docstring), applied by ``enable_block_sparse_attention``.
    """

    threshold: float | None = 0.9
    topk: int | None = None
    block: int = 128
    local: int = 1
    sinks: int = 0
    tile_3d: tuple[int, int, int] | None = None
    min_seq_len: int = 0
    mode: str = "adaptive"
    window: tuple[int, int, int] | None = None
    table: str | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.block < 16 or self.block > 256 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two in [16, 256], got {self.block}")
        if self.local < 0 or self.sinks < 0 or self.min_seq_len < 0:
            raise ValueError("local, sinks and min_seq_len must be >= 0")
        if self.tile_3d is not None:
            tile = tuple(int(s) for s in self.tile_3d)
            if len(tile) != 3 or min(tile) < 1:
                raise ValueError(f"tile_3d must be three positive ints, got {self.tile_3d}")
            object.__setattr__(self, "tile_3d", tile)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.window is not None:
            window = tuple(int(s) for s in self.window)
            if len(window) != 3 or min(window) < 1:
                raise ValueError(f"window must be three positive ints (tiles along t, h, w), got {self.window}")
            object.__setattr__(self, "window", window)
        if self.mode == "static" and (self.window is None or self.tile_3d is None):
            raise ValueError("mode=static needs window=WtxWhxWw and tile_3d=TtxThxTw (the window counts tiles)")
        if self.mode != "static" and self.window is not None:
            raise ValueError("window is only used with mode=static")

    @property
    def static(self) -> bool:
        """True for the fixed sliding-tile window (no score estimate)."""
        return self.mode == "static"

    @property
    def full(self) -> bool:
        """True when every block is kept (the mask need not be estimated)."""
        return not self.static and self.threshold is not None and self.threshold >= 1.0

    @classmethod
    def parse(cls, spec: str | None) -> BlockSparseConfig | None:
        """``"dense"`` (or empty) -> None; ``"block_sparse(threshold=0.9,block=128)"`` -> config."""
        text = (spec or "").strip()
        if text.lower() in ("", "dense"):
            return None
        m = re.fullmatch(r"block_sparse\s*(?:\((.*)\))?", text, flags=re.IGNORECASE | re.DOTALL)
        if m is None:
            raise ValueError(f"attention option must be 'dense' or 'block_sparse(...)', got {spec!r}")
        kwargs: dict[str, object] = {}
        for item in filter(None, (s.strip() for s in (m.group(1) or "").split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key not in _FIELD_PARSERS:
                raise ValueError(f"bad block_sparse argument {item!r}; known: {', '.join(_FIELD_PARSERS)}")
            try:
                kwargs[key] = _FIELD_PARSERS[key](value)
            except ValueError as e:
                raise ValueError(f"bad value for {key}: {value!r}") from e
        return cls(**kwargs)

    def to_option(self) -> str:
        """Inverse of :meth:`parse`."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SHOWN_WHEN_SET and value == f.default:
                continue  # keeps the option strings of earlier results unchanged
            if f.name in ("tile_3d", "window") and value is not None:
                value = "x".join(str(s) for s in value)
            parts.append(f"{f.name}={'none' if value is None else value}")
        return f"block_sparse({','.join(parts)})"


MODES = ("adaptive", "static")
# fields added with the static mode (2026-12-08): to_option writes them only when they differ from the default
_SHOWN_WHEN_SET = ("mode", "window", "table")


def _triple(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[x*]", s))


def _optional(conv):
    return lambda s: None if s.lower() in ("none", "null", "") else conv(s)


_FIELD_PARSERS = {
    "threshold": _optional(float),
    "topk": _optional(int),
    "block": int,
    "local": int,
    "sinks": int,
    "tile_3d": _optional(_triple),
    "min_seq_len": int,
    "mode": lambda s: s.lower(),
    "window": _optional(_triple),
    "table": _optional(str),
}


class _SharedState:
    """Per-model state shared by its processors: token grid of the current forward, caches."""

    def __init__(self) -> None:
        self.grid: tuple[int, int, int] | None = None
        self.perm_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        # static (STA) masks: (grid, tile, window, block, local, sinks, device) -> (kv_counts, kv_indices,
        # [1, 1, Mq, Mk] mask, sparsity), built on the first call for a grid and reused by every later step
        self.static_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _is_wan_attention(attn) -> bool:
    # WanAttention (diffusers >= 0.35) takes rotary_emb positionally and has no `group_norm`
    return type(attn).__name__ == "WanAttention"


def _stock_processor_for(attn):
    if _is_wan_attention(attn):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# The two ends of diffusers' AttnProcessor2_0, shared by the processors here and in nasa_processor.py, which
# reproduce its arithmetic around their own attention core.


def processor_prologue(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """Input side of AttnProcessor2_0: spatial norm, [B, C, H, W] -> [B, H*W, C], group norm.

    Returns (hidden_states [B, N, C], the residual, the input's image shape (B, C, H, W) or None for 3-D input).
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = None
    if hidden_states.ndim == 4:
        image_shape = hidden_states.shape
        batch, channel, height, width = image_shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, image_shape


def processor_epilogue(attn, out: torch.Tensor, residual: torch.Tensor, image_shape) -> torch.Tensor:
    """Output side of AttnProcessor2_0 for the heads merged back ([B, N, H*D]): output projection and dropout,
    back to the input's image shape, residual connection, output rescale."""
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if image_shape is not None:
        out = out.transpose(-1, -2).reshape(image_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _kernel_module():
    from . import block_sparse_attention

    return block_sparse_attention


def _apply_wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as WanAttnProcessor's rotary embedding (interleaved pairs), so results match
    # it bit for bit. x: [B, N, H, D], cos/sin: [1, N, 1, D]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class BlockSparseAttnProcessor:
    """Attention processor running self-attention through the block-sparse Triton kernel.

    Works on ``Attention`` modules that use ``AttnProcessor2_0`` semantics and on ``WanAttention``.
    ``last_sparsity`` holds the fraction of skipped blocks of the latest call (0-dim tensor, no host
    sync) or None when that call ran dense. ``allow_cpu_interpreter`` lets the kernel run on CPU
    under ``TRITON_INTERPRET=1`` (tests only; very slow). ``backend="reference"`` computes the same
    masked attention with the fp32 torch reference on any device/dtype (quality studies only).
    """

    def __init__(
        self,
        threshold: float | None = 0.9,
        topk: int | None = None,
        block: int = 128,
        local: int = 1,
        sinks: int = 0,
        tile_3d: tuple[int, int, int] | None = None,
        min_seq_len: int = 0,
        *,
        config: BlockSparseConfig | None = None,
        dense_processor=None,
        allow_cpu_interpreter: bool = False,
        shared_state: _SharedState | None = None,
        backend: str = "triton",
    ) -> None:
        self.config = config or BlockSparseConfig(
            threshold=threshold, topk=topk, block=block, local=local, sinks=sinks, tile_3d=tile_3d,
            min_seq_len=min_seq_len,
        )
        self.dense_processor = dense_processor
        self.allow_cpu_interpreter = allow_cpu_interpreter
        self.backend = _check_backend(backend)
        self.state = shared_state or _SharedState()
        self.last_sparsity: torch.Tensor | None = None
        # token grid of this layer's sequence, set by a hook on the module that knows it (a StreamUNet frame
        # attention: frames x rows x cols); None: the model-wide grid (a DiT's patchified input)
        self.grid: tuple[int, int, int] | None = None
        self._stock_processors: dict[bool, object] = {}

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        wan = _is_wan_attention(attn)
        reason = self._fallback_reason(attn, hidden_states, encoder_hidden_states, attention_mask)
        if reason is not None:
            self.last_sparsity = None
            dense = self.dense_processor or self._stock(attn, wan)
            if wan:
                return dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
            return dense(attn, hidden_states, encoder_hidden_states, attention_mask, temb=temb, **kwargs)
        if wan:
            return self._wan_forward(attn, hidden_states, rotary_emb)
        return self._attention_forward(attn, hidden_states, temb)

    # -- dispatch --------------------------------------------------------------------------------

    def _stock(self, attn, wan: bool):
        # installed model-wide via set_attn_processor: cross-attention lands here without a delegate
        if wan not in self._stock_processors:
            self._stock_processors[wan] = _stock_processor_for(attn)
        return self._stock_processors[wan]

    def _fallback_reason(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> str | None:
        if encoder_hidden_states is not None:
            _log_once("cross-attention stays dense", logging.DEBUG)
            return "cross-attention"
        if attention_mask is not None:
            return self._reason("an attention mask is present")
        if self.backend == "reference":
            key = f"reference backend on {hidden_states.device.type}"
            if key not in _logged_reasons:
                _logged_reasons.add(key)
                logger.warning(_REFERENCE_NOTICE, hidden_states.device.type)
            return self._short_sequence(hidden_states)
        if hidden_states.device.type != "cuda":
            if not (self.allow_cpu_interpreter and _interpreting()):
                return self._reason(f"not on CUDA (device {hidden_states.device.type})")
        dtype = attn.to_out[0].weight.dtype
        if torch.is_autocast_enabled(hidden_states.device.type):
            dtype = torch.get_autocast_dtype(hidden_states.device.type)
        if dtype not in (torch.float16, torch.bfloat16):
            return self._reason(f"dtype {dtype} unsupported (fp16/bf16 only)")
        kv_inner = getattr(attn, "kv_inner_dim", None) or getattr(attn, "inner_kv_dim", None)
        if kv_inner is not None and kv_inner != attn.inner_dim:
            return self._reason("grouped/multi-query kv heads unsupported")
        head_dim = attn.inner_dim // attn.heads
        kernels = _kernel_module()
        if not kernels.is_supported_head_dim(head_dim):
            return self._reason(f"head dim {head_dim} unsupported")
        if not kernels.HAS_TRITON:
            return self._reason("triton is not installed")
        return self._short_sequence(hidden_states)

    def _short_sequence(self, hidden_states: torch.Tensor) -> str | None:
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])
        if n < self.config.min_seq_len:
            _log_once(f"sequence shorter than min_seq_len={self.config.min_seq_len}", logging.DEBUG)
            return "short sequence"
        return None

    @staticmethod
    def _reason(reason: str) -> str:
        _log_once(reason)
        return reason

    # -- token permutation (3-D tiling) -------------------------------------------------------------

    def _permutation(self, n_tokens: int, device: torch.device):
        tile = self.config.tile_3d
        if tile is None:
            return None, None
        grid = self._grid()
        if grid is None or math.prod(grid) != n_tokens:
            _log_once("tile_3d ignored: token grid unknown or not matching the sequence", logging.INFO)
            return None, None
        key = (grid, tile, str(device))
        if key not in self.state.perm_cache:
            self.state.perm_cache[key] = tile_3d_permutation(*grid, tile, device=device)
        return self.state.perm_cache[key]

    def _grid(self) -> tuple[int, int, int] | None:
        return self.grid if self.grid is not None else self.state.grid

    def _static_mask(self, n_tokens: int, device: torch.device):
        """Cached (kv_counts, kv_indices, mask [1, 1, Mq, Mk], sparsity) of the STA window, or None (no grid)."""
        cfg = self.config
        grid = self._grid()
        if grid is None or math.prod(grid) != n_tokens:
            _log_once("mode=static runs dense: token grid unknown or not matching the sequence", logging.INFO)
            return None
        key = (grid, cfg.tile_3d, cfg.window, cfg.block, cfg.local, cfg.sinks, str(device))
        cached = self.state.static_cache.get(key)
        if cached is None:
            mask = static_tile_mask(grid, cfg.tile_3d, cfg.window, cfg.block, cfg.block, local=cfg.local,
                                    sinks=cfg.sinks, device=device)[None, None]  # mask: [1, 1, Mq, Mk]
            counts, indices = _kernel_module().mask_to_indices(mask)
            cached = (counts, indices, mask, 1.0 - mask.float().mean())
            self.state.static_cache[key] = cached
        return cached

    def _permuted_rope(self, rotary_emb, perm: torch.Tensor):
        cos, sin = rotary_emb
        key = (cos.data_ptr(), sin.data_ptr(), tuple(cos.shape), self._grid(), self.config.tile_3d)
        cached = self.state.rope_cache
        if cached is None or cached[0] != key:
            cached = (key, (cos.index_select(1, perm), sin.index_select(1, perm)))
            self.state.rope_cache = cached
        return cached[1]

    # -- attention core ---------------------------------------------------------------------------

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: [B, H, N, D] (possibly strided views) -> [B, H, N, D]
        if self.backend == "reference":
            return self._attend_reference(q, k, v)
        kernels = _kernel_module()
        if not (q.dtype == k.dtype == v.dtype and q.dtype in kernels.SUPPORTED_DTYPES):
            _log_once(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} unsupported")
            self.last_sparsity = None
            return F.scaled_dot_product_attention(q, k, v)
        cfg = self.config
        if cfg.full:
            self.last_sparsity = torch.zeros((), device=q.device)
            return kernels.block_sparse_attention(q, k, v, block_m=cfg.block, block_n=cfg.block)
        if cfg.static:
            static = self._static_mask(q.shape[2], q.device)
            if static is None:
                self.last_sparsity = None
                return F.scaled_dot_product_attention(q, k, v)
            counts, indices, _, self.last_sparsity = static
            return kernels.block_sparse_attention(q, k, v, kv_counts=counts, kv_indices=indices,
                                                  block_m=cfg.block, block_n=cfg.block)
        res = build_block_mask(
            q, k, block_m=cfg.block, block_n=cfg.block, threshold=cfg.threshold, topk=cfg.topk,
            local=cfg.local, sinks=cfg.sinks,
        )
        self.last_sparsity = res.sparsity
        return kernels.block_sparse_attention(q, k, v, res.mask, block_m=cfg.block, block_n=cfg.block)

    def _attend_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # same mask as the kernel path, attention by the fp32 oracle of reference.py; chunked over the
        # batch so the [b, H, Nq, Nk] fp32 score matrix stays near _REFERENCE_CHUNK_ELEMS elements
        from .reference import attention_ref, block_sparse_attention_ref

        cfg = self.config
        if cfg.full:
            mask = None
            self.last_sparsity = torch.zeros((), device=q.device)
        elif cfg.static:
            static = self._static_mask(q.shape[2], q.device)
            if static is None:
                self.last_sparsity = None
                mask = None
            else:
                mask = static[2].expand(q.shape[0], q.shape[1], -1, -1)  # mask: [B, H, Mq, Mk]
                self.last_sparsity = static[3]
        else:
            res = build_block_mask(
                q, k, block_m=cfg.block, block_n=cfg.block, threshold=cfg.threshold, topk=cfg.topk,
                local=cfg.local, sinks=cfg.sinks,
            )
            mask = res.mask  # mask: [B, H, Mq, Mk]
            self.last_sparsity = res.sparsity
        B, H, n_q, _ = q.shape
        step = max(1, _REFERENCE_CHUNK_ELEMS // max(1, H * n_q * k.shape[2]))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # out: [B, H, Nq, D]
        for i in range(0, B, step):
            sl = slice(i, i + step)
            if mask is None:
                o = attention_ref(q[sl], k[sl], v[sl])
            else:
                o = block_sparse_attention_ref(q[sl], k[sl], v[sl], mask[sl], cfg.block, cfg.block)
            out[sl] = o.to(q.dtype)
        return out

    def _wan_forward(self, attn, hidden_states: torch.Tensor, rotary_emb) -> torch.Tensor:
        # hidden_states: [B, N, C]
        perm, inv = self._permutation(hidden_states.shape[1], hidden_states.device)
        if perm is not None:
            # per-token ops (projections, norms, rope) commute with the permutation
            hidden_states = hidden_states.index_select(1, perm)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # query: [B, N, H, D]
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            cos, sin = self._permuted_rope(rotary_emb, perm) if perm is not None else rotary_emb
            query = _apply_wan_rope(query, cos, sin)
            key = _apply_wan_rope(key, cos, sin)
        # the kernel takes [B, H, N, D] views of the [B, N, H, D] buffers; its output keeps that layout
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)  # out: [B, N, C]
        if inv is not None:
            out = out.index_select(1, inv)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _attention_forward(self, attn, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        # mirrors AttnProcessor2_0 for self-attention without a mask
        hidden_states, residual, image_shape = processor_prologue(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        perm, inv = self._permutation(hidden_states.shape[1], hidden_states.device)
        if perm is not None:
            hidden_states = hidden_states.index_select(1, perm)
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # query: [B, H, N, D]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self._attend(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if inv is not None:
            out = out.index_select(1, inv)
        return processor_epilogue(attn, out, residual, image_shape)


def _is_self_attention(name: str, module) -> bool:
    is_cross = getattr(module, "is_cross_attention", None)
    if is_cross is not None:
        return not is_cross and not getattr(module, "only_cross_attention", False)
    return name.rsplit(".", 1)[-1] == "attn1"


def _replaceable(processor) -> bool:
    # only processors whose math the block-sparse path reproduces
    return type(processor).__name__ in ("AttnProcessor2_0", "WanAttnProcessor")


def _token_grid(model, x) -> tuple[int, int, int] | None:
    """Post-patchify token grid (T, H, W) of a DiT input, row-major as the model flattens it."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if not isinstance(x, torch.Tensor) or patch is None:
        return None
    if x.ndim == 5:
        pt, ph, pw = patch if isinstance(patch, (tuple, list)) and len(patch) == 3 else (1, patch, patch)
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
    if x.ndim == 4:
        p = patch[-1] if isinstance(patch, (tuple, list)) else patch
        return 1, x.shape[2] // p, x.shape[3] // p
    return None


def self_attention_layers(model: torch.nn.Module) -> list[str]:
    """Module names of the self-attention layers ``enable_block_sparse_attention`` considers, in module order
    (the per-layer table names a layer by one of these or by its index in this list)."""
    return [name for name, module in model.named_modules()
            if hasattr(module, "set_processor") and hasattr(module, "processor") and _is_self_attention(name, module)]


def load_layer_table(path: str | os.PathLike) -> dict[str, str]:
    """Read a per-layer attention table: ``{"layers": {layer: spec}}`` (or the bare mapping) -> {layer: spec}."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"attention table {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"attention table {path}: not JSON ({e})") from None
    layers = data.get("layers", data) if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not all(isinstance(v, str) for v in layers.values()):
        raise ValueError(f'attention table {path}: expected {{"layers": {{"<layer>": "dense" | "static(3x3x3)" | '
                         f'"adaptive(0.9)" | "block_sparse(...)"}}}}')
    return {str(k): v for k, v in layers.items()}


_LAYER_SPEC = re.compile(r"\s*(static|adaptive)\s*\(\s*([^)]*?)\s*\)\s*", re.IGNORECASE)


def layer_config(spec: str, base: BlockSparseConfig) -> BlockSparseConfig | None:
    """One table entry -> the layer's config (None: dense). ``static(W)``/``adaptive(T)`` keep ``base``'s other
    fields; ``block_sparse(...)`` stands alone."""
    m = _LAYER_SPEC.fullmatch(spec)
    if m is None:
        try:
            cfg = BlockSparseConfig.parse(spec)
        except ValueError as e:
            raise ValueError(f"bad layer setting {spec!r}: use dense, static(WtxWhxWw), adaptive(THRESHOLD) or "
                             f"block_sparse(...) ({e})") from None
        return None if cfg is None else dataclasses.replace(cfg, table=None)
    kind, arg = m.group(1).lower(), m.group(2)
    try:
        if kind == "static":
            return dataclasses.replace(base, mode="static", window=_triple(arg), table=None)
        return dataclasses.replace(base, mode="adaptive", window=None, threshold=float(arg), table=None)
    except ValueError as e:
        raise ValueError(f"bad layer setting {spec!r}: {e}") from None


def _resolve_table(model: torch.nn.Module, cfg: BlockSparseConfig) -> dict[str, BlockSparseConfig | None]:
    """Layer name -> its config (None: dense) for every self-attention layer."""
    names = self_attention_layers(model)
    base = dataclasses.replace(cfg, table=None)
    out: dict[str, BlockSparseConfig | None] = dict.fromkeys(names, base)
    if cfg.table is None:
        return out
    for key, spec in load_layer_table(cfg.table).items():
        name = key
        if key not in out:
            if key.isdigit() and int(key) < len(names):
                name = names[int(key)]
            else:
                raise ValueError(f"attention table {cfg.table}: unknown layer {key!r}; valid: 0..{len(names) - 1} "
                                 f"or {', '.join(names) or '(the model has no self-attention layer)'}")
        out[name] = layer_config(spec, base)
    return out


def _grid_hooks(model: torch.nn.Module) -> list:
    """Hooks that give processors inside a sub-module the token grid only that sub-module knows.

    StreamUNet frame attention (``joint``/``frames``/``attn``, input ``[B*T, C, h, w]``): joint layers attend over
    ``T x h x w`` cells in (t, row, col) order, the others over the ``T`` frames of one cell; a continuous
    ``Transformer2DModel`` (a UNet's spatial attention, input ``[B, C, h, w]``) over one frame's ``h x w`` cells.
    """
    handles = []
    for name, mod in model.named_modules():
        if mod is model:
            continue
        if hasattr(mod, "joint") and hasattr(mod, "frames") and isinstance(getattr(mod, "attn", None), torch.nn.Module):
            def grid_of(m, x):
                return (m.frames, x.shape[2], x.shape[3]) if m.joint else (m.frames, 1, 1)
        elif type(mod).__name__ == "Transformer2DModel" and getattr(mod.config, "patch_size", None) is None:
            def grid_of(m, x):
                return 1, x.shape[2], x.shape[3]
        else:
            continue
        procs = [m.processor for m in mod.modules() if isinstance(getattr(m, "processor", None), BlockSparseAttnProcessor)]
        if not procs:
            continue

        def _set(m, args, kwargs, procs=procs, grid_of=grid_of):
            x = args[0] if args else kwargs.get("hidden_states")
            grid = grid_of(m, x) if isinstance(x, torch.Tensor) and x.ndim == 4 else None
            for p in procs:
                p.grid = grid

        handles.append(mod.register_forward_pre_hook(_set, with_kwargs=True))
    return handles


def enable_block_sparse_attention(
    model: torch.nn.Module,
    cfg: BlockSparseConfig | str | None,
    *,
    allow_cpu_interpreter: bool = False,
    backend: str = "triton",
) -> int:
    """Install :class:`BlockSparseAttnProcessor` on the self-attention modules of ``model``.

    ``cfg`` may be a config, an option string, or None/"dense" (restores dense, returns 0). Only
    modules running the stock ``AttnProcessor2_0``/``WanAttnProcessor`` are replaced (calling this
    again re-configures already replaced ones). ``cfg.table``: per-layer settings (module docstring);
    a layer the table sets to dense keeps (or gets back) its stock processor. Returns the number of
    modules now block-sparse.
    ``backend="reference"``: the fp32 torch oracle instead of the Triton kernel, on any device
    (quality studies; logged; see the module docstring). ``model`` must be the denoiser itself (the
    module whose ``patch_size`` config gives the token grid for ``tile_3d``), not a wrapper.
    """
    _check_backend(backend)
    if isinstance(cfg, str) or cfg is None:
        cfg = BlockSparseConfig.parse(cfg)
    if cfg is None:
        disable_block_sparse_attention(model)
        return 0
    per_layer = _resolve_table(model, cfg)
    state = _SharedState()
    replaced = 0
    for name, module in model.named_modules():
        if name not in per_layer:
            continue
        current = module.processor
        if isinstance(current, BlockSparseAttnProcessor):
            current = current.dense_processor or _stock_processor_for(module)
        layer_cfg = per_layer[name]
        if layer_cfg is None:
            module.set_processor(current)  # dense by the table
            continue
        if not _replaceable(current):
            _log_once(f"{name}: processor {type(current).__name__} is not replaced", logging.INFO)
            continue
        module.set_processor(
            BlockSparseAttnProcessor(
                config=layer_cfg, dense_processor=current, allow_cpu_interpreter=allow_cpu_interpreter,
                shared_state=state, backend=backend,
            )
        )
        replaced += 1
    if backend != "triton":
        logger.info("block-sparse attention (%s) on %d modules of %s with the %s backend",
                    cfg.to_option(), replaced, type(model).__name__, backend)

    for old in getattr(model, _HOOK_ATTR, None) or ():
        old.remove()

    def _record_grid(mod, args, kwargs):
        # the processors only see [B, N, C]; the 3-D tiling needs the (T, H, W) grid of this call
        x = args[0] if args else kwargs.get("hidden_states")
        state.grid = _token_grid(mod, x)
        state.rope_cache = None

    hooks = [model.register_forward_pre_hook(_record_grid, with_kwargs=True), *_grid_hooks(model)]
    setattr(model, _HOOK_ATTR, hooks)
    return replaced


def disable_block_sparse_attention(model: torch.nn.Module) -> int:
    """Put the original processors back; returns how many were restored."""
    restored = 0
    for _, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, BlockSparseAttnProcessor) and hasattr(module, "set_processor"):
            module.set_processor(processor.dense_processor or _stock_processor_for(module))
            restored += 1
    hooks = getattr(model, _HOOK_ATTR, None)
    if hooks is not None:
        for hook in hooks:
            hook.remove()
        delattr(model, _HOOK_ATTR)
    return restored


def block_sparse_processors(model: torch.nn.Module) -> list[BlockSparseAttnProcessor]:
    """The installed processors, in module order (e.g. to read ``last_sparsity``)."""
    return [
        m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), BlockSparseAttnProcessor)
    ]
