"""ONNX export of a FewStepPipeline's components: text encoder(s), denoiser, VAE decoder.

Each component is wrapped in a small ``nn.Module`` whose inputs are exactly the tensors FewStepPipeline passes to
that component (``encode_tokens``, ``_model``, ``decode``), with named inputs and outputs and dynamic batch and
spatial axes. The module is exported in the dtype it already has (build a pipeline in fp16 to get an fp16 graph):
strongly typed TensorRT takes its precision from the graph's tensor types.

Exporter: ``torch.onnx.export(dynamo=True)`` on a ``torch.export`` program. The legacy TorchScript exporter
cannot express our dynamic spatial sizes for DiTs (it bakes PatchEmbed's native-size position table into the
trace and guards ``squeeze(1)`` with an ``If`` that onnxruntime rejects). Three adjustments, confined to the
export and checked against the unmodified torch module by tests/unit/engines/test_tensorrt.py:

* attention processors are reset to diffusers' ``AttnProcessor2_0`` (a Triton block-sparse processor does not
  export);
* a DiT's cross-attention mask is handed over as the per-head bias that ``Attention.prepare_attention_mask``
  would build (``[B*heads, 1, L]``); its own ``repeat_interleave`` yields an unbacked size that breaks export;
* PatchEmbed computes its sin-cos position table from the traced grid size, as it already does eagerly for
  every size except the native one (same function, same values).

Two passes after ``torch.export`` fix what the ONNX lowering gets wrong: ``squeeze(dim)`` of a dim that is
provably not 1 under the declared ranges is dropped (onnxscript lowers it to an unconditional ONNX ``Squeeze``,
which fails at run time), and mixed-dtype ``cat`` inputs get the casts torch's type promotion implies (ONNX
Concat takes one type; strongly typed TensorRT refuses the graph otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("fewstep.engines")

# Bump when a wrapper's inputs, outputs or graph change: it is part of every engine cache key.
EXPORT_VERSION = 1
OPSET = 18  # the dynamo exporter's floor; TensorRT 10.x and TensorRT-RTX 1.x parse it
COMPONENTS = ("text_encoder", "text_encoder_2", "denoiser", "vae")
# Export-time ranges of the dynamic axes. Optimization profiles narrow them later; the lower spatial bound
# keeps every spatial extent > 1 so that no size-1 special case (squeeze, broadcast) is baked in.
MAX_BATCH = 1024
MAX_SIDE_PX = 8192


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. dims: ints are static; "batch", "height", "width" are the dynamic axes, in units of
    this tensor's own grid (latent elements for latents, pixels for images and pixel-space samples). Output dims
    are informative: the engine infers them."""

    name: str
    dims: tuple[int | str, ...]
    dtype: torch.dtype


@dataclass
class ComponentSpec:
    """What one exported component takes and returns, and how pixels map onto its spatial axes."""

    component: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    spatial_scale: int = 1     # image pixels per element of the spatial axes (the VAE factor for latents)
    spatial_multiple: int = 1  # spatial axes must be multiples of this (patch size, UNet down-sampling)
    batch_factor: int = 1      # the denoiser runs the CFG-doubled batch


def components(pipe) -> list[str]:
    """The exportable components this pipeline has (pixel-space models have no VAE; SD/DiTs no second encoder)."""
    have = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "denoiser": pipe.denoiser,
            "vae": pipe.vae}
    return [c for c in COMPONENTS if have[c] is not None]


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def text_max_length(pipe, component: str = "text_encoder") -> int:
    """The fixed token length FewStepPipeline.tokenize pads this encoder's prompts to."""
    if component == "text_encoder_2":
        return pipe.tokenizer_2.model_max_length
    return int(pipe.tokenize([""])["ids"].shape[1])


# -- wrappers: the exact calls FewStepPipeline makes --------------------------------------------------------------
class TextEncoderExport(nn.Module):
    """encode_tokens for SD and DiTs: ``encoder(ids, attention_mask=mask)[0]`` -> hidden_states [B, L, D]."""

    def __init__(self, encoder: nn.Module, masked: bool):
        super().__init__()
        self.encoder, self.masked = encoder, masked

    def forward(self, input_ids, attention_mask=None):
        return self.encoder(input_ids, attention_mask=attention_mask if self.masked else None)[0]


class SDXLTextEncoderExport(nn.Module):
    """encode_tokens for SDXL: ``out = encoder(ids, output_hidden_states=True)``; the pipeline keeps
    ``out.hidden_states[-2]`` [B, L, D] and ``out[0]`` (pooled projection [B, P] for CLIPTextModelWithProjection)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]


class UNetExport(nn.Module):
    """_model for UNets: ``unet(sample, timestep, encoder_hidden_states, timestep_cond=..., added_cond_kwargs=...)``.
    The optional inputs are present only when the model takes them (LCM guidance embedding, SDXL micro-conditions)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, text_embeds=None, time_ids=None):
        kw = {}
        if timestep_cond is not None:
            kw["timestep_cond"] = timestep_cond
        if text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kw)[0]


class DiTExport(nn.Module):
    """_model for PixArt-style DiTs: ``transformer(hidden_states, encoder_hidden_states=, encoder_attention_mask=,
    timestep=, added_cond_kwargs={resolution, aspect_ratio})``; the mask is the tokenizer's [B, L] 0/1 mask."""

    def __init__(self, transformer: nn.Module, heads: int):
        super().__init__()
        self.transformer, self.heads = transformer, heads

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, resolution=None,
                aspect_ratio=None):
        b, n = encoder_attention_mask.shape
        # The bias PixArt derives from a 0/1 mask, already repeated per head the way prepare_attention_mask does.
        bias = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
        bias = bias[:, None, None, :].expand(b, self.heads, 1, n).reshape(b * self.heads, 1, n)
        return self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=bias, timestep=timestep,
                                added_cond_kwargs={"resolution": resolution, "aspect_ratio": aspect_ratio},
                                return_dict=False)[0]


class VAEDecoderExport(nn.Module):
    """decode: ``vae.decode(z, return_dict=False)[0]``, z already unscaled by the pipeline -> image [B, 3, H, W]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


def _cross_attention_heads(transformer: nn.Module) -> int:
    from diffusers.models.attention_processor import Attention

    heads = {m.heads for name, m in transformer.named_modules() if isinstance(m, Attention) and name.endswith("attn2")}
    if len(heads) != 1:
        raise NotImplementedError(f"cross-attention head counts {sorted(heads)}: the export hands one per-head mask "
                                  "to every cross-attention module, so they must agree")
    return heads.pop()


def wrap(pipe, component: str) -> tuple[nn.Module, ComponentSpec]:
    """The export wrapper of ``component`` and its I/O spec (dtypes as FewStepPipeline passes them)."""
    if component in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, component)
        seq = text_max_length(pipe, component)
        ids = TensorSpec("input_ids", ("batch", seq), torch.int64)
        hidden = enc.config.hidden_size
        if pipe.family == "sdxl":
            out0 = enc.config.projection_dim if hasattr(enc, "text_projection") else None
            spec = ComponentSpec(component, [ids], [
                TensorSpec("hidden_states", ("batch", seq, hidden), _dtype(enc)),
                TensorSpec("pooled", ("batch", out0) if out0 else ("batch", seq, hidden), _dtype(enc))])
            return SDXLTextEncoderExport(enc), spec
        masked = pipe.family == "dit" or bool(getattr(enc.config, "use_attention_mask", False))
        inputs = [ids] + ([TensorSpec("attention_mask", ("batch", seq), torch.int64)] if masked else [])
        spec = ComponentSpec(component, inputs, [TensorSpec("hidden_states", ("batch", seq, hidden), _dtype(enc))])
        return TextEncoderExport(enc, masked), spec

    if component == "denoiser":
        den, cfg = pipe.denoiser, pipe.denoiser.config
        c = pipe.latent_channels
        sample_dt = _dtype(den)
        spatial = ("batch", c, "height", "width")
        L = text_max_length(pipe)
        D = cfg.cross_attention_dim if pipe.denoiser_name == "unet" else cfg.caption_channels
        common = dict(spatial_scale=pipe.vae_scale_factor, spatial_multiple=pipe.size_multiple // pipe.vae_scale_factor,
                      batch_factor=2)
        if pipe.denoiser_name == "unet":
            inputs = [TensorSpec("sample", spatial, sample_dt), TensorSpec("timestep", ("batch",), torch.float32),
                      TensorSpec("encoder_hidden_states", ("batch", L, D), sample_dt)]
            if pipe.time_cond_dim:
                inputs.append(TensorSpec("timestep_cond", ("batch", pipe.time_cond_dim), sample_dt))
            if pipe.family == "sdxl":
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                inputs += [TensorSpec("text_embeds", ("batch", pooled), sample_dt),
                           TensorSpec("time_ids", ("batch", 6), sample_dt)]
            out = TensorSpec("out", ("batch", cfg.out_channels, "height", "width"), sample_dt)
            return UNetExport(den), ComponentSpec(component, inputs, [out], **common)
        additional = bool(getattr(den, "use_additional_conditions", False))
        inputs = [TensorSpec("hidden_states", spatial, sample_dt),
                  TensorSpec("encoder_hidden_states", ("batch", L, D), sample_dt),
                  TensorSpec("encoder_attention_mask", ("batch", L), torch.int64),
                  TensorSpec("timestep", ("batch",), torch.float32)]
        if additional:
            inputs += [TensorSpec("resolution", ("batch", 2), sample_dt),
                       TensorSpec("aspect_ratio", ("batch", 1), sample_dt)]
        out = TensorSpec("out", ("batch", cfg.out_channels, "height", "width"), sample_dt)
        wrapper = DiTExport(den, _cross_attention_heads(den))
        return wrapper, ComponentSpec(component, inputs, [out], **common)

    if component == "vae":
        vae = pipe.vae
        vdt = _dtype(vae)
        f = pipe.vae_scale_factor
        spec = ComponentSpec(component, [TensorSpec("latent", ("batch", vae.config.latent_channels, "height", "width"),
                                                    vdt)],
                             [TensorSpec("image", ("batch", vae.config.out_channels, "height", "width"), vdt)],
                             spatial_scale=f, spatial_multiple=1)
        return VAEDecoderExport(vae), spec
    raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")


def example_inputs(spec: ComponentSpec, device: torch.device, batch: int = 2, height: int | None = None,
                   width: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs that fit ``spec``. Defaults use distinct, non-trivial sizes (batch 2, height 2m, width 3m) so
    that export cannot specialize a dynamic axis on a coincidence (1, or height == width)."""
    m = spec.spatial_multiple
    height = height or 2 * m
    width = width or 3 * m
    g = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "height": height, "width": width}
    out = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.dims]
        if t.name == "input_ids":
            x = torch.randint(0, 100, shape, generator=g)
        elif t.name in ("attention_mask", "encoder_attention_mask"):
            x = torch.ones(shape, dtype=torch.int64)
            for i in range(shape[0]):  # ragged prompt lengths
                x[i, 1 + (3 * i + 5) % (shape[1] - 1):] = 0
        elif t.name == "timestep":
            x = torch.rand(shape, generator=g) * 999
        elif t.name == "time_ids":
            x = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(shape[0], 1)
            x = x * spec.spatial_scale
        elif t.name == "resolution":
            x = torch.tensor([[height, width]], dtype=torch.float32).repeat(shape[0], 1) * spec.spatial_scale
        elif t.name == "aspect_ratio":
            x = torch.full(shape, height / width)
        else:
            x = torch.randn(shape, generator=g)
        out[t.name] = x.to(device=device, dtype=t.dtype)
    return out


# -- export-only adjustments ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _export_mode(module: nn.Module):
    """Default SDPA attention processors and size-generic PatchEmbed position tables, restored afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.embeddings import PatchEmbed

    saved_procs = None
    if hasattr(module, "attn_processors") and hasattr(module, "set_attn_processor"):
        saved_procs = module.attn_processors
        module.set_attn_processor(AttnProcessor2_0())
    patched = []
    for m in module.modules():
        if isinstance(m, PatchEmbed) and m.pos_embed is not None and not m.pos_embed_max_size:
            patched.append((m, m.height, m.width))
            m.height = m.width = -1  # never equal to a traced size: always take the computed-table branch
    try:
        yield
    finally:
        for m, h, w in patched:
            m.height, m.width = h, w
        if saved_procs is not None:
            module.set_attn_processor(saved_procs)


def _drop_noop_squeezes(ep: torch.export.ExportedProgram) -> int:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten = torch.ops.aten
    dropped = 0
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.squeeze.dim, aten.squeeze.dims):
            continue
        val = node.args[0].meta.get("val")
        if val is None:
            continue
        dims = node.args[1] if len(node.args) > 1 else []
        dims = [dims] if isinstance(dims, int) else list(dims)
        sizes = [val.shape[d] for d in dims]
        if all(statically_known_true(s != 1) for s in sizes):
            node.replace_all_uses_with(node.args[0])
            ep.graph.erase_node(node)
            dropped += 1
        elif not all(isinstance(s, int) for s in sizes):
            raise RuntimeError(f"export: squeeze of a dynamic axis that may be 1 ({sizes}) at {node.name}; raise "
                               "the axis's lower bound")
    if dropped:
        ep.graph_module.recompile()
    return dropped


def _promote_cat_inputs(ep: torch.export.ExportedProgram) -> int:
    """Cast mixed-dtype ``cat`` inputs to their promoted dtype, as torch does implicitly. The exporter emits a plain
    ONNX Concat, which must not mix types (SDXL concatenates fp16 text embeds with fp32 time embeds)."""
    import functools

    aten = torch.ops.aten
    cast = aten._to_copy.default
    n = 0
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.cat.default, aten.concat.default):
            continue
        vals = [a.meta.get("val") for a in node.args[0]]
        if any(v is None for v in vals) or len({v.dtype for v in vals}) < 2:
            continue
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in vals))
        args = []
        for a, v in zip(node.args[0], vals):
            if v.dtype != dtype:
                with ep.graph.inserting_before(node):
                    c = ep.graph.call_function(cast, (a,), {"dtype": dtype})
                c.meta["val"] = v.to(dtype)
                a = c
            args.append(a)
        node.args = (args, *node.args[1:])
        n += 1
    if n:
        ep.graph_module.recompile()
    return n


def _dynamic_shapes(spec: ComponentSpec) -> dict[str, dict | None]:
    """torch.export dynamic_shapes of the wrapper's (keyword) inputs."""
    from torch.export import Dim

    # Batch is a hint, not a hard range: diffusers' Upsample2D branches on batch >= 64 and on numel (both into a
    # no-op .contiguous()), and export would otherwise refuse the range. Parity tests cover batch 1 and > 1.
    batch = Dim.DYNAMIC(min=1, max=MAX_BATCH)
    m = spec.spatial_multiple
    max_side = MAX_SIDE_PX // (spec.spatial_scale * m)
    # Spatial axes are m * k with k >= 2: divisibility is then provable (UNet skip connections, patchify).
    hk, wk = Dim("h", min=2, max=max_side), Dim("w", min=2, max=max_side)
    axes = {"batch": batch, "height": m * hk if m > 1 else hk, "width": m * wk if m > 1 else wk}
    return {t.name: {i: axes[d] for i, d in enumerate(t.dims) if isinstance(d, str)} or None for t in spec.inputs}


def export(pipe, component: str, path: str | Path, *, opset: int = OPSET,
           example: dict[str, torch.Tensor] | None = None) -> ComponentSpec:
    """Export ``component`` of ``pipe`` to ``path`` (weights in ``path``.data next to it). Returns its spec."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper, spec = wrap(pipe, component)
    wrapper.eval()
    device = next(wrapper.parameters()).device
    example = example or example_inputs(spec, device)
    kwargs = {t.name: example[t.name] for t in spec.inputs}
    with _export_mode(wrapper), torch.no_grad():
        ep = torch.export.export(wrapper, (), kwargs, dynamic_shapes=_dynamic_shapes(spec), strict=False)
    n, m = _drop_noop_squeezes(ep), _promote_cat_inputs(ep)
    if n or m:
        log.debug("export %s: dropped %d squeeze(s) of axes never 1, cast inputs of %d mixed-dtype cat(s)",
                  component, n, m)
    torch.onnx.export(ep, (), str(path), kwargs=kwargs, dynamo=True, opset_version=opset, external_data=True,
                      input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                      verbose=False)
    return spec
