"""NASA (Negative-Away Steer Attention, SNOOPI, arXiv 2412.02687) as a diffusers attention processor.

A one- or few-step model has no unconditional pass to push away from, and CFG at one step blends the negative
prompt's content into the image. NASA instead subtracts the negative prompt's cross-attention output inside every
cross-attention layer::

    Z = softmax(Q K+^T / sqrt(d)) V+  -  alpha * softmax(Q K-^T / sqrt(d)) V-

with K-/V- the layer's own key/value projections of the negative prompt's text embedding (no new weights), and
then the layer's output projection as usual. ``alpha`` (``nasa_scale``) is per sample: a batch may mix requests
with and without negative prompts (alpha 0 rows: the positive attention minus exactly zero).

Rows may instead take Normalized Attention Guidance's renormalised form (NAG, Chen et al., arXiv 2505.21179), per
sample ``(phi, tau, alpha)`` (``nag_scale``, ``nag_tau``, ``nag_alpha``)::

    Z~ = phi Z+ - (phi - 1) Z-,   Z^ = Z~ min(r, tau) / r  with  r = |Z~|_1 / |Z+|_1  per token,
    Z  = alpha Z^ + (1 - alpha) Z+

(the L1 norms over all heads' channels of a query token): the steered features may not grow past tau times the
prompt's own, and only a share alpha of them replaces Z+, which bounds the drift plain subtraction has at large
scales. ``nag_renorm`` is that per-token epilogue; the two attentions run as for plain NASA (the fused kernel also
writes Z+ for it).

``enable_nasa(model)`` installs :class:`NasaAttnProcessor` on every cross-attention module running the stock
``AttnProcessor2_0`` (UNets' ``attn2``, PixArt-style DiTs' ``attn2``, our default student's); it returns the
model's :class:`NasaState`, or None when the model has no such module (then it cannot take a negative prompt
this way). The processor does nothing until ``NasaState.active`` sets a negative conditioning for one forward;
otherwise it hands the call to the stock processor, so a request without a negative prompt runs the same code
as without NASA installed. On CUDA with fp16/bf16 and prefix (right-padded) key masks the two attentions run as
one Triton kernel (``nasa_attention.py``); elsewhere as two SDPA calls (the reference path).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention_processor import _interpreting, processor_epilogue, processor_prologue

__all__ = ["NasaAttnProcessor", "NasaState", "disable_nasa", "enable_nasa", "nag_renorm", "nasa_state"]

logger = logging.getLogger("fewstep.kernels")
_STATE_ATTR = "_fewstep_nasa_state"


@dataclass
class NasaState:
    """Per-model state shared by its NASA processors. Set only inside ``active`` (one forward at a time: the engine
    thread owns the model)."""

    modules: int = 0  # cross-attention modules carrying the processor
    neg: torch.Tensor | None = None  # [B, L, D] negative text embedding
    neg_mask: torch.Tensor | None = None  # [B, L] bool / 0-1, or None (attend to all)
    pos_mask: torch.Tensor | None = None  # [B, L] the positive prompt's mask as the pipeline passed it
    alpha: torch.Tensor | None = None  # [B] fp32
    # [B, 3] fp32 (phi, tau, alpha) of NAG's renormalised form per image; a row of phi 0 runs plain NASA (``alpha``)
    nag: torch.Tensor | None = None
    # the model's own text-side projection before its cross-attention (PixArt's caption_projection, a UNet's
    # encoder_hid_proj): the negative embedding takes the same path as the prompt's
    project: object | None = None
    use_kernel: bool = True  # the Triton kernel where it applies (tests switch it off to compare)
    allow_cpu_interpreter: bool = False
    calls: int = field(default=0, compare=False)  # NASA forwards run (tests check the processors ran)

    @contextlib.contextmanager
    def active(self, neg: torch.Tensor, alpha: torch.Tensor, neg_mask: torch.Tensor | None = None,
               pos_mask: torch.Tensor | None = None, nag: torch.Tensor | None = None):
        """Condition the forwards inside the block on ``neg`` ([B, L, D] text embedding, one row per image of the
        batch: the processors refuse a batch of another size). ``nag``: [B, 3] (phi, tau, alpha) for rows that take
        the renormalised form (phi > 0), or None (every row plain NASA; ``NasaInput.nag_rows`` gives None where no
        row renormalises, so plain batches run exactly the plain path, with no device sync to find that out)."""
        if self.project is not None:
            neg = self.project(neg).view(neg.shape[0], neg.shape[1], -1)
        self.neg, self.alpha, self.neg_mask, self.pos_mask = neg, alpha.float(), neg_mask, pos_mask
        self.nag = None if nag is None else nag.float()
        try:
            yield self
        finally:
            self.neg = self.alpha = self.neg_mask = self.pos_mask = self.nag = None


def _prefix_lengths(mask: torch.Tensor | None, n: int) -> torch.Tensor | None | bool:
    """Per-row key counts of a right-padded 0/1 mask; False when the mask is not a prefix mask."""
    if mask is None:
        return None
    m = mask.bool()
    lengths = m.sum(-1)
    prefix = torch.arange(n, device=m.device)[None, :] < lengths[:, None]
    return lengths.to(torch.int32) if torch.equal(prefix, m) else False


class NasaAttnProcessor:
    """Cross-attention with the negative prompt's attention subtracted (see the module docstring)."""

    def __init__(self, state: NasaState, inner=None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.state = state
        self.inner = inner or AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        st = self.state
        if st.neg is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        st.calls += 1
        # mirrors AttnProcessor2_0 for cross-attention, with a second key/value set
        hidden_states, residual, image_shape = processor_prologue(attn, hidden_states, temb)
        batch = hidden_states.shape[0]
        neg, alpha, neg_mask, nag = st.neg, st.alpha, st.neg_mask, st.nag
        if batch != neg.shape[0]:
            # models that fold frames into the batch (StreamUNet: [B*T] rows, text repeated per frame) see each
            # image's conditioning repeated; the negative follows the same order
            if batch % neg.shape[0]:
                raise ValueError(f"NASA negative conditioning has {neg.shape[0]} rows for a batch of {batch}")
            rep = batch // neg.shape[0]
            neg, alpha = neg.repeat_interleave(rep, 0), alpha.repeat_interleave(rep, 0)
            nag = None if nag is None else nag.repeat_interleave(rep, 0)
            neg_mask = None if neg_mask is None else neg_mask.repeat_interleave(rep, 0)
        pos_bias = None
        if attention_mask is not None:
            pos_bias = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            pos_bias = pos_bias.view(batch, attn.heads, -1, pos_bias.shape[-1])

        query = attn.to_q(hidden_states)
        neg = neg.to(encoder_hidden_states.dtype)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            neg = attn.norm_encoder_hidden_states(neg)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key_n, value_n = attn.to_k(neg), attn.to_v(neg)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):  # [B, N, H*D] -> [B, H, N, D] (a view)
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value, key_n, value_n = map(heads, (query, key, value, key_n, value_n))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key, key_n = attn.norm_k(key), attn.norm_k(key_n)

        alpha = alpha.to(query.device)
        kernel_alpha = alpha
        if nag is not None:
            nag = nag.to(query.device)
            renorm, phi = nag[:, 0] > 0, nag[:, 0]
            # the kernel's combination on renormalising rows is Z~ / phi = Z+ - (phi - 1) / phi Z-
            kernel_alpha = torch.where(renorm, (phi - 1) / torch.where(renorm, phi, 1.0), alpha)
        fused = self._kernel(query, key, value, key_n, value_n, kernel_alpha, attention_mask, neg_mask,
                             return_pos=nag is not None)
        if fused is None:
            pos = F.scaled_dot_product_attention(query, key, value, attn_mask=pos_bias, dropout_p=0.0,
                                                 is_causal=False)
            neg_bias = None
            if neg_mask is not None:
                neg_bias = neg_mask.bool().to(query.device)[:, None, None, :]
            negative = F.scaled_dot_product_attention(query, key_n, value_n, attn_mask=neg_bias, dropout_p=0.0,
                                                      is_causal=False)
            out = pos - alpha.to(pos.dtype).view(-1, 1, 1, 1) * negative
            if nag is not None:
                phi4 = phi.view(-1, 1, 1, 1)
                guided = phi4 * pos.float() - (phi4 - 1) * negative.float()
        elif nag is not None:
            out, pos = fused
            guided = phi.view(-1, 1, 1, 1) * out.float()
        else:
            out = fused
        if nag is not None:
            # plain rows keep their output bit for bit; renormalising rows take NAG's
            out = torch.where(renorm.view(-1, 1, 1, 1), nag_renorm(pos, guided, nag[:, 1], nag[:, 2]), out)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return processor_epilogue(attn, out, residual, image_shape)

    def _kernel(self, q, k, v, kn, vn, alpha, attention_mask, neg_mask, return_pos: bool = False):
        """The fused kernel's output (with ``return_pos``: ``(output, Z+)``), or None where it does not apply (the
        caller runs two SDPA calls)."""
        st = self.state
        if not st.use_kernel or q.dtype not in (torch.float16, torch.bfloat16):
            return None
        if q.device.type != "cuda" and not (st.allow_cpu_interpreter and _interpreting()):
            return None
        from . import nasa_attention as na

        if not na.HAS_TRITON or not na.is_supported_head_dim(q.shape[-1]):
            return None
        len_pos = None
        if attention_mask is not None:
            # the kernel takes key counts: only the pipeline's own right-padded text mask qualifies
            if st.pos_mask is None or st.pos_mask.shape[0] != q.shape[0]:
                return None
            len_pos = _prefix_lengths(st.pos_mask, k.shape[2])
            if len_pos is False:
                return None
        len_neg = _prefix_lengths(neg_mask, kn.shape[2])
        if len_neg is False:
            return None
        return na.nasa_attention(q, k, v, kn, vn, alpha, len_pos=len_pos, len_neg=len_neg, return_pos=return_pos)


def nag_renorm(pos: torch.Tensor, guided: torch.Tensor, tau: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """NAG's epilogue: ``alpha clip_tau(guided) + (1 - alpha) pos`` in pos's dtype, pos/guided ``[B, H, N, D]``,
    tau/alpha ``[B]``. The clip scales a query token's guided features (all heads) down to an L1 norm of tau times
    pos's where they exceed it; the norms and the blend are fp32."""
    p, g = pos.float(), guided.float()
    limit = tau.float().view(-1, 1, 1, 1) * p.abs().sum(dim=(1, 3), keepdim=True)  # [B, 1, N, 1]
    norm = g.abs().sum(dim=(1, 3), keepdim=True)
    # only where the norm exceeds the limit (so norm > 0): no 0/0 for tokens whose features are all zero
    factor = torch.where(norm > limit, limit / torch.where(norm > limit, norm, 1.0), 1.0)
    a = alpha.float().view(-1, 1, 1, 1)
    return (a * (g * factor) + (1 - a) * p).to(pos.dtype)


def _is_cross_attention(name: str, module) -> bool:
    is_cross = getattr(module, "is_cross_attention", None)
    if is_cross is not None:
        return bool(is_cross)
    return name.rsplit(".", 1)[-1] == "attn2"


def enable_nasa(model: torch.nn.Module, allow_cpu_interpreter: bool = False) -> NasaState | None:
    """Install NASA on the cross-attention modules of ``model``; returns its state (None: no such module)."""
    state = nasa_state(model)
    if state is not None:
        return state
    project = getattr(model, "caption_projection", None) or getattr(model, "encoder_hid_proj", None)
    state = NasaState(allow_cpu_interpreter=allow_cpu_interpreter, project=project)
    for name, module in model.named_modules():
        if not hasattr(module, "set_processor") or not _is_cross_attention(name, module):
            continue
        current = module.processor
        if type(current).__name__ != "AttnProcessor2_0":
            logger.info("%s: processor %s is not replaced by NASA", name, type(current).__name__)
            continue
        module.set_processor(NasaAttnProcessor(state, current))
        state.modules += 1
    if not state.modules:
        return None
    setattr(model, _STATE_ATTR, state)
    return state


def nasa_state(model: torch.nn.Module) -> NasaState | None:
    return getattr(model, _STATE_ATTR, None)


def disable_nasa(model: torch.nn.Module) -> int:
    """Put the stock processors back; returns how many were restored."""
    restored = 0
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, NasaAttnProcessor) and hasattr(module, "set_processor"):
            module.set_processor(proc.inner)
            restored += 1
    if hasattr(model, _STATE_ATTR):
        delattr(model, _STATE_ATTR)
    return restored
