"""The model-agnostic few-step pipeline: encode_prompt -> denoise (sampler x model) -> decode.

One class serves every family we load (SD/SD-Turbo/LCM UNets, SDXL UNets, PixArt-style DiTs, pixel-space
DiTs such as our default model). Family differences are confined to three places: how prompts become
conditioning (`encode_prompt`), how the denoiser is called (`_model`) and whether there is a VAE (`decode`).

Randomness is per image: every image owns a ``torch.Generator`` (seeded on the CPU, so the draw is the same on
every device), and initial latents and any re-noising are drawn per image. A batch therefore produces exactly the
images its members would produce alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass

import torch

from .loading import Checkpoint, CheckpointError
from .runner import Capabilities
from .samplers import (
    MAX_STEPS,
    Schedule,
    consistency_step,
    euler_ancestral_step,
    euler_step,
    make_schedule,
    rectified_flow_step,
    step_coefficients,
    x0_from_model_output,
)
from .sizes import ServedSizes

log = logging.getLogger("fewstep.engines")


def enable_xformers(denoiser, vae, device: torch.device) -> int:
    """``--attention xformers``: diffusers' ``XFormersAttnProcessor`` (xformers' memory-efficient attention) on every
    self-attention module of the denoiser and the VAE; cross-attention keeps its processor (NASA steers it). Returns
    how many modules changed. Raises ValueError saying what to do where xformers cannot run: it has no CPU kernels,
    is an optional install, and a wheel built for another torch imports but fails at its first call, so one tiny
    call is made here, at load, rather than in the first request."""
    if device.type != "cuda":
        raise ValueError("attention 'xformers' needs a CUDA device (xformers has no CPU kernels); use 'dense'")
    try:
        import xformers
        import xformers.ops as xops
    except ImportError as e:
        raise ValueError("attention 'xformers' needs the xformers package built for the installed torch "
                         f"{torch.__version__} (pip install xformers); it is not installed: use 'dense' (PyTorch's "
                         "SDPA)") from e
    q = torch.zeros(1, 16, 1, 64, device=device, dtype=torch.float16)
    try:
        xops.memory_efficient_attention(q, q, q)
    # Deliberate boundary: whatever xformers raises here (missing kernels, an ABI mismatch) becomes the message.
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"xformers {xformers.__version__} is installed but cannot run with torch {torch.__version__} "
                         f"on this GPU ({type(e).__name__}: {e}); use 'dense'") from e
    from diffusers.models.attention_processor import Attention, XFormersAttnProcessor

    n = 0
    for model in (denoiser, vae):
        for m in (model.modules() if model is not None else ()):
            if isinstance(m, Attention) and not m.is_cross_attention:
                m.set_processor(XFormersAttnProcessor())
                n += 1
    return n


@dataclass
class PromptEmbeds:
    """Conditioning for a batch of prompts. embeds: [B, L, D]; mask: [B, L] or None; pooled: [B, P] or None."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, i) -> PromptEmbeds:
        sl = slice(i, i + 1) if isinstance(i, int) else i
        return PromptEmbeds(self.embeds[sl], None if self.mask is None else self.mask[sl],
                            None if self.pooled is None else self.pooled[sl])

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        def c(xs):
            return None if xs[0] is None else torch.cat(xs)
        return PromptEmbeds(c([p.embeds for p in items]), c([p.mask for p in items]), c([p.pooled for p in items]))


#: NASA's default alpha (nasa_scale) when a request gives a negative prompt but no scale
DEFAULT_NASA_SCALE = 0.5
#: NAG's defaults (``nag_scale``, ``nag_tau``, ``nag_alpha``) for what a request leaves out when it asks for the
#: renormalised form: tau and alpha are the NAG authors' defaults for UNet models (2.5, 0.5), phi 3 is ours; none of
#: them keeps adherence on our embedded models (docs/guidance.md, 2026-12-08), so plain NASA stays the default
DEFAULT_NAG_SCALE, DEFAULT_NAG_TAU, DEFAULT_NAG_ALPHA = 3.0, 2.5, 0.5
#: the ranges a request's NAG fields must lie in, closed (the one source: the HTTP models and EngineCore use them):
#: phi 1 steers nothing, past ~10 the clip at tau does all the work; tau below 1 would shrink the prompt's features
NAG_RANGES = {"nag_scale": (1.0, 10.0), "nag_tau": (1.0, 10.0), "nag_alpha": (0.0, 1.0)}


@dataclass(frozen=True)
class NagParams:
    """Normalized Attention Guidance's renormalised form of NASA for one image (kernels/nasa_processor.py):
    ``scale`` phi (1: no steering), ``tau`` the L1-norm ratio ceiling, ``alpha`` the blend weight."""

    scale: float = DEFAULT_NAG_SCALE
    tau: float = DEFAULT_NAG_TAU
    alpha: float = DEFAULT_NAG_ALPHA

    @classmethod
    def of(cls, scale: float | None = None, tau: float | None = None, alpha: float | None = None,
           base: NagParams | None = None) -> NagParams:
        """The given fields over ``base``'s (default: the defaults)."""
        base = base or cls()
        return cls(base.scale if scale is None else float(scale), base.tau if tau is None else float(tau),
                   base.alpha if alpha is None else float(alpha))

    def row(self) -> tuple[float, float, float]:
        return (self.scale, self.tau, self.alpha)


#: a plain-NASA row of ``NasaInput.nag`` (phi 0 selects plain subtraction)
PLAIN_NASA_ROW = (0.0, 0.0, 0.0)


@dataclass
class NasaInput:
    """Negative prompts for NASA: one embedding row and one scale (alpha, 0 = no steering) per image; ``nag``: [B, 3]
    (phi, tau, alpha) for images that take NAG's renormalised form instead (rows of ``PLAIN_NASA_ROW``: plain)."""

    negative: PromptEmbeds
    alpha: torch.Tensor  # [B] fp32
    nag: torch.Tensor | None = None  # [B, 3] fp32

    @staticmethod
    def nag_rows(params: list[NagParams | None]) -> torch.Tensor | None:
        """``nag`` for images with these settings (None: plain NASA or no negative prompt); None if none has one."""
        if all(p is None for p in params):
            return None
        return torch.tensor([PLAIN_NASA_ROW if p is None else p.row() for p in params], dtype=torch.float32)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled LCMs (``time_cond_proj_dim``). w: [B]."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb  # [B, dim]


def _vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2^(levels - 1) for SD-style VAEs (block_out_channels) and Wan's (dim_mult)."""
    if vae is None:
        return 1
    # From the architecture, not AutoencoderKLWan's scale_factor_spatial field (a constant 8 in its config
    # defaults, whatever dim_mult says); a Wan 2.2 VAE patchifies on top (patch_size).
    cfg = vae.config
    levels = cfg.get("block_out_channels") or cfg.get("dim_mult")
    return 2 ** (len(levels) - 1) * int(cfg.get("patch_size") or 1)


def _prompt_completion(ckpt: Checkpoint, spec) -> tuple[re.Pattern, str] | None:
    """``fewstep.prompt_completion`` = ``{"unless": REGEX, "append": TEXT}``: a model trained only on captions that
    end in one kind of phrase reads prompts without it badly (our default image student: 12% strict adherence on
    "a red circle above a blue square" over 16 seeds, 75% with " on a white background"), so its checkpoint says
    how to complete them. A property of the checkpoint, not of the server: nothing is appended for others."""
    if spec is None:
        return None
    where = ckpt.path / "model_index.json"
    if not isinstance(spec, dict) or set(spec) != {"unless", "append"} or not all(
            isinstance(spec[k], str) for k in spec):
        raise CheckpointError(f'{where}: fewstep.prompt_completion must be {{"unless": REGEX, "append": TEXT}}, '
                              f"got {spec!r}")
    try:
        return re.compile(spec["unless"], re.IGNORECASE), spec["append"]
    except re.error as e:
        raise CheckpointError(f"{where}: fewstep.prompt_completion.unless is not a regular expression: {e}") from None


def _example_prompts(ckpt: Checkpoint, spec) -> tuple[str, ...]:
    """``fewstep.example_prompts`` = a list of prompts the checkpoint draws well, for clients to offer (the page's
    chips and default prompt). A model trained on a narrow grammar draws little else, and only its checkpoint knows."""
    if spec is None:
        return ()
    if not isinstance(spec, list) or not all(isinstance(p, str) and p.strip() for p in spec):
        raise CheckpointError(f"{ckpt.path / 'model_index.json'}: fewstep.example_prompts must be a list of "
                              f"non-empty strings, got {spec!r}")
    return tuple(spec)


class FewStepPipeline:
    """The eager ``Runner`` (engines/runner.py); the compiled and TensorRT backends wrap one."""

    kind = "image"  # StreamPipeline (engines/stream/) says "video"
    compile_seconds = 0.0  # eager: nothing to compile

    def __init__(self, ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 attention: str = "dense", adapters: str | None = None):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = dtype
        c = ckpt.components
        self.denoiser_name = ckpt.denoiser_name
        self.denoiser = c[self.denoiser_name]
        self.vae = c.get("vae")
        self.text_encoder = c.get("text_encoder")
        self.text_encoder_2 = c.get("text_encoder_2")
        self.tokenizer = c.get("tokenizer")
        self.tokenizer_2 = c.get("tokenizer_2")
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{ckpt.path}: needs a text_encoder and a tokenizer component")
        cfg = self.denoiser.config
        if self.denoiser_name == "unet":
            self.family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"
        elif type(self.denoiser).__name__ == "WanTransformer3DModel":
            self.family = "wan"  # video latents through AutoencoderKLWan; streams only (engines/stream)
            if self.kind != "video":
                raise CheckpointError(f"{ckpt.path / 'model_index.json'}: a WanTransformer3DModel checkpoint is a "
                                      'video model: set "fewstep": {"kind": "video", ...} to serve it as streams')
        else:
            self.family = "dit"
        self.latent_channels = cfg.in_channels
        self.vae_scale_factor = _vae_scale_factor(self.vae)
        self.time_cond_dim = cfg.get("time_cond_proj_dim") if self.family != "dit" else None
        if self.upcasts_vae(dtype):
            log.info("SDXL VAE config sets force_upcast: decoding in float32")
            self.vae.to(torch.float32)
        meta = ckpt.meta
        self.sampler = make_schedule(ckpt.scheduler_class, ckpt.scheduler_config, 1, ckpt.pipeline_class).kind
        self.default_steps = int(meta.get("default_steps", 4 if self.sampler == "consistency" else 1))
        self.default_guidance = float(meta.get("default_guidance_scale",
                                               8.5 if self.time_cond_dim else 0.0))
        sample = cfg.get("sample_size")
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        if sample is None and meta.get("default_size") is None:
            raise CheckpointError(f"{ckpt.path / 'model_index.json'}: the {type(self.denoiser).__name__} config has no "
                                  "sample_size; set fewstep.default_size")
        self.default_size = int(meta.get("default_size") or sample * self.vae_scale_factor)
        self.prompt_completion = _prompt_completion(ckpt, meta.get("prompt_completion"))
        self.example_prompts = _example_prompts(ckpt, meta.get("example_prompts"))
        patch = cfg.get("patch_size", 1)
        patch = max(patch[1:]) if isinstance(patch, (list, tuple)) else patch  # Wan: (t, h, w)
        self.size_multiple = self.vae_scale_factor * (2 ** max(0, len(cfg.get("block_out_channels", [0])) - 1)
                                                      if "block_out_channels" in cfg else patch)
        try:  # what admission accepts (EngineCore); check_size below is what the architecture can run at all
            self.served_sizes = ServedSizes.from_meta(meta, self.default_size, self.size_multiple,
                                                      str(ckpt.path / "model_index.json"))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        self._schedules: dict[int, Schedule] = {}
        self._schedules_i2i: dict[tuple[int, float], Schedule] = {}
        # Lin et al.'s guidance rescale (phi) for CFG checkpoints whose card recommends it; 0: plain CFG
        self.guidance_rescale = float(meta.get("guidance_rescale", 0.0))
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise CheckpointError(f"{ckpt.path / 'model_index.json'}: fewstep.guidance_rescale must be in [0, 1], "
                                  f"got {self.guidance_rescale}")
        self.fused_cfg = True  # CFG steps through kernels/fused_cfg.py on CUDA (benchmarks switch it off to compare)
        self.attention = attention
        if attention == "xformers":
            n = enable_xformers(self.denoiser, self.vae, self.device)
            log.info("attention xformers installed on %d self-attention modules (denoiser and VAE)", n)
        elif attention != "dense":
            from fewstep.kernels.attention_processor import BlockSparseConfig, enable_block_sparse_attention

            n = enable_block_sparse_attention(self.denoiser, BlockSparseConfig.parse(attention))
            log.info("attention %s installed on %d self-attention modules of the %s", attention, n,
                     self.denoiser_name)
        self._setup_guidance(adapters)

    # -- guidance modes ----------------------------------------------------------------------------------------------
    def _setup_guidance(self, adapters: str | None) -> None:
        """NASA on the cross-attention modules (negative prompts without CFG) and, when given or found beside the
        checkpoint, AGD-style guidance adapters (engines/adapters.py: guidance > 1 in one pass)."""
        from fewstep.kernels.nasa_processor import enable_nasa

        from .adapters import AdapterError, find_adapters, load_adapters

        # Wan's cross-attention runs its own processor (not replaced): video streams of Wan take no negative prompt
        self.nasa = enable_nasa(self.denoiser)
        self.adapters = None
        folder = adapters or find_adapters(self.ckpt.path)
        if folder is not None:
            try:
                self.adapters = load_adapters(self.denoiser, folder)
            except AdapterError as e:
                raise CheckpointError(str(e)) from None
            log.info("guidance adapters (rank %d) on %d projections from %s", self.adapters.rank,
                     len(self.adapters.names), folder)

    @property
    def guidance_modes(self) -> tuple[str, ...]:
        """How this model takes guidance: none (one plain pass), cfg (a doubled batch; also negative prompts at
        guidance_scale > 1), agd (guidance adapters: guidance_scale > 1 in one pass), nasa (negative prompts at
        guidance_scale <= 1, in the cross-attention)."""
        modes = ["none"]
        if not self.time_cond_dim:
            modes.append("cfg")
        if self.adapters is not None:
            modes.append("agd")
        if self.nasa is not None:
            modes.append("nasa")
        return tuple(modes)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kind=self.kind, backend="eager", sizes=self.served_sizes, default_size=self.default_size,
                            default_steps=self.default_steps, default_guidance=self.default_guidance,
                            sampler=self.sampler, prompt_completion=self.prompt_completion,
                            example_prompts=self.example_prompts,
                            guidance_modes=self.guidance_modes)

    # -- stage 1 ---------------------------------------------------------------------------------------------
    def _tokenize(self, tokenizer, prompts: list[str], max_length: int):
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt")

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Host side of stage 1: token ids (and masks) on the device, fixed length per model."""
        dev = self.device
        if self.family == "sd":
            tok = self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
            out = {"ids": tok.input_ids.to(dev)}
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                out["mask"] = tok.attention_mask.to(dev)
            return out
        if self.family == "sdxl":
            out = {"ids": self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length).input_ids.to(dev)}
            if self.text_encoder_2 is not None:
                out["ids_2"] = self._tokenize(self.tokenizer_2, prompts,
                                              self.tokenizer_2.model_max_length).input_ids.to(dev)
            return out
        # DiTs (PixArt with T5, our default with a small CLIP text model): masked last hidden state.
        # PixArt pads T5 prompts to 120 tokens (its pipeline default); other encoders use their own length.
        default_len = (512 if self.family == "wan" else  # WanPipeline's max_sequence_length
                       120 if "T5" in type(self.text_encoder).__name__ else self.tokenizer.model_max_length)
        max_len = int(self.ckpt.meta.get("max_sequence_length") or default_len)
        tok = self._tokenize(self.tokenizer, prompts, max_len)
        return {"ids": tok.input_ids.to(dev), "mask": tok.attention_mask.to(dev)}

    def encode_tokens(self, tok: dict[str, torch.Tensor]) -> PromptEmbeds:
        """Device side of stage 1 (graph-capturable)."""
        if self.family == "sd":
            emb = self.text_encoder(tok["ids"], attention_mask=tok.get("mask"))[0]
            return PromptEmbeds(emb.to(self.dtype))
        if self.family == "sdxl":
            embeds, pooled = [], None
            for key, encoder in (("ids", self.text_encoder), ("ids_2", self.text_encoder_2)):
                if encoder is None:
                    continue
                out = encoder(tok[key], output_hidden_states=True)
                pooled = out[0]  # the last encoder's pooled (projected) output
                embeds.append(out.hidden_states[-2])
            return PromptEmbeds(torch.cat(embeds, dim=-1).to(self.dtype), pooled=pooled.to(self.dtype))
        emb = self.text_encoder(tok["ids"], attention_mask=tok["mask"])[0]
        if self.family == "wan":
            # Wan's cross-attention takes no mask: its pipeline zeroes the padded positions instead
            return PromptEmbeds((emb * tok["mask"][..., None].to(emb.dtype)).to(self.dtype))
        return PromptEmbeds(emb.to(self.dtype), mask=tok["mask"])

    def complete_prompt(self, prompt: str) -> str:
        """``prompt`` as the model reads it: with the checkpoint's ``fewstep.prompt_completion`` appended when the
        prompt lacks what every training caption had (our default models: a background phrase). Empty prompts (the
        unconditional branch) and negative prompts are never completed."""
        if self.prompt_completion is None or not prompt.strip():
            return prompt
        unless, append = self.prompt_completion
        return prompt if unless.search(prompt) else prompt.rstrip() + append

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds:
        return self.encode_tokens(self.tokenize([self.complete_prompt(p) for p in prompts]))

    def negative_embeds(self, negative_prompts: list[str]) -> PromptEmbeds:
        """Unconditional branch for CFG. SDXL zeroes an empty negative prompt, as its pipeline does by default."""
        if self.family == "sdxl" and all(not p for p in negative_prompts):
            pos = self.encode_prompt([""])
            z = PromptEmbeds(torch.zeros_like(pos.embeds), pooled=torch.zeros_like(pos.pooled))
            return PromptEmbeds.cat([z] * len(negative_prompts))
        with torch.no_grad():
            return self.encode_tokens(self.tokenize(negative_prompts))

    # -- stage 2 ---------------------------------------------------------------------------------------------
    def schedule(self, steps: int) -> Schedule:
        if steps not in self._schedules:
            self._schedules[steps] = make_schedule(self.ckpt.scheduler_class, self.ckpt.scheduler_config, steps,
                                                   self.ckpt.pipeline_class,
                                                   self.ckpt.meta.get("flow_sigmas", "scheduler"))
        return self._schedules[steps]

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"size {width}x{height} must be a multiple of {m} on both sides for this model")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def noise_steps(self, steps: int) -> int:
        """How many fresh noise draws per image the sampler needs after the initial one."""
        return steps - 1 if self.schedule(steps).kind in ("euler_ancestral", "consistency") else 0

    def draw_noise(self, generators: list[torch.Generator], height: int, width: int,
                   steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Initial noise [B, C, h, w] and the per-step re-noising draws, on the device.

        Drawn per image on the CPU in fp32, in the order diffusers draws them (initial, then one per re-noised
        step), so results are identical across devices, batch sizes and precisions."""
        shape = self.latent_shape(height, width)
        per_image = [[torch.randn((1, *shape), generator=g, dtype=torch.float32)
                      for _ in range(1 + self.noise_steps(steps))] for g in generators]
        draws = [torch.cat(col).to(self.device) for col in zip(*per_image)]
        return draws[0], draws[1:]

    def conditioning(self, batch: int, height: int, width: int, guidance_scale: float) -> dict[str, torch.Tensor]:
        """Constant extra inputs of the denoiser for one request shape (built once, outside any CUDA graph).
        ``batch`` counts the CFG-doubled batch."""
        c: dict[str, torch.Tensor] = {"guidance": torch.tensor(float(guidance_scale), device=self.device)}
        if self.adapters is not None and guidance_scale > 1.0:
            # AGD: the adapters' per-sample scale is guidance - 1 (0 at guidance 1: the plain conditional model)
            c["adapter_scale"] = torch.full((batch,), guidance_scale - 1.0, device=self.device)
        if self.denoiser_name == "unet":
            if self.time_cond_dim:
                w = torch.full((batch,), guidance_scale - 1.0)
                c["timestep_cond"] = guidance_embedding(w, self.time_cond_dim).to(self.device, self.dtype)
            if self.family == "sdxl":
                c["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype,
                                             device=self.device).repeat(batch, 1)
        elif getattr(self.denoiser, "use_additional_conditions", False):
            c["resolution"] = torch.tensor([[height, width]], dtype=self.dtype, device=self.device).repeat(batch, 1)
            c["aspect_ratio"] = torch.tensor([[height / width]], dtype=self.dtype,
                                             device=self.device).repeat(batch, 1)
        return c

    def _model(self, x: torch.Tensor, t: float, cond: PromptEmbeds, consts: dict[str, torch.Tensor]) -> torch.Tensor:
        """One denoiser call, with the request's adapter scale (AGD) and negative conditioning (NASA) in force for
        this call only."""
        if self.adapters is None and "nasa_alpha" not in consts:
            return self._denoiser_call(x, t, cond, consts)  # the plain path: nothing for torch.compile to trace
        with contextlib.ExitStack() as stack:
            if self.adapters is not None:
                stack.enter_context(self._adapter_scale(consts.get("adapter_scale")))
            if "nasa_alpha" in consts:
                stack.enter_context(self.nasa.active(consts["nasa_neg_embeds"], consts["nasa_alpha"],
                                                     consts.get("nasa_neg_mask"), cond.mask, consts.get("nasa_nag")))
            return self._denoiser_call(x, t, cond, consts)

    @contextlib.contextmanager
    def _adapter_scale(self, scale: torch.Tensor | None):
        self.adapters.scale = scale
        try:
            yield
        finally:
            self.adapters.scale = None

    def _denoiser_call(self, x: torch.Tensor, t: float, cond: PromptEmbeds,
                       consts: dict[str, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        x = x.to(self.dtype)
        tt = torch.full((b,), t, device=self.device, dtype=torch.float32)
        if self.denoiser_name == "unet":
            kw = {}
            if "timestep_cond" in consts:
                kw["timestep_cond"] = consts["timestep_cond"]
            if "time_ids" in consts:
                kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": consts["time_ids"]}
            return self.denoiser(x, tt, encoder_hidden_states=cond.embeds, return_dict=False, **kw)[0]
        added = {"resolution": consts.get("resolution"), "aspect_ratio": consts.get("aspect_ratio")}
        out = self.denoiser(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=tt,
                            added_cond_kwargs=added, return_dict=False)[0]
        if out.shape[1] == 2 * self.latent_channels:  # learned-sigma DiTs: keep the mean prediction
            out = out[:, : self.latent_channels]
        return out

    def _predict(self, x_in, t, cond, uncond, consts):
        """Denoiser output with classifier-free guidance when an unconditional branch is given (the torch path;
        ``_fused_guided_step`` is the same arithmetic in one Triton pass on CUDA)."""
        if uncond is None:
            return self._model(x_in, t, cond, consts).float()
        both = self._model(torch.cat([x_in, x_in]), t, PromptEmbeds.cat([uncond, cond]), consts).float()
        u, c = both.chunk(2)
        if self.guidance_rescale > 0:
            from fewstep.kernels.reference import cfg_combine_ref

            return cfg_combine_ref(u, c, consts["guidance"], self.guidance_rescale)
        return u + consts["guidance"] * (c - u)

    def _fuses_cfg(self, x: torch.Tensor) -> bool:
        """Whether CFG steps run as kernels/fused_cfg.py's single pass: CUDA with triton, eager only (under
        torch.compile inductor fuses the torch path's elementwise ops itself)."""
        if not (self.fused_cfg and x.is_cuda) or torch.compiler.is_compiling():
            return False
        from fewstep.kernels.fused_cfg import HAS_TRITON

        return HAS_TRITON

    def _fused_guided_step(self, sched: Schedule, i: int, x: torch.Tensor, x_in: torch.Tensor, t: float,
                           cond: PromptEmbeds, uncond: PromptEmbeds, consts: dict[str, torch.Tensor],
                           fresh: torch.Tensor | None) -> torch.Tensor:
        """One CFG step as model call + one fused combine/rescale/update pass (matches the torch path within fp32
        rounding: tests/kernels/test_fused_cfg.py)."""
        from fewstep.kernels.fused_cfg import fused_cfg_step

        both = self._model(torch.cat([x_in, x_in]), t, PromptEmbeds.cat([uncond, cond]), consts)
        a, b, n = step_coefficients(sched, i, fresh is not None)
        return fused_cfg_step(both, x, consts["guidance"], a, b, fresh if n else None, n, self.guidance_rescale)

    def batch_plan(self, n: int, height: int, width: int, steps: int) -> list[int]:
        """Rows per sub-batch for ``n`` waiting images: eager runs any batch size as one (the compiled backend
        overrides this with measured bucket costs)."""
        return [n]

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether this guidance scale runs a second (unconditional) branch: not with a guidance embedding
        (time_cond_dim) nor with guidance adapters, which take the scale in one pass."""
        return guidance_scale > 1.0 and not self.time_cond_dim and self.adapters is None

    def denoise_latents(self, noise: torch.Tensor, step_noise: list[torch.Tensor], cond: PromptEmbeds,
                        uncond: PromptEmbeds | None, steps: int, consts: dict[str, torch.Tensor],
                        x: torch.Tensor | None = None, sched: Schedule | None = None, start: int = 0) -> torch.Tensor:
        """The device-only part of sampling: no host sync, no host->device copy, so it can be CUDA-graphed.
        noise: [B, C, h, w] fp32; step_noise: one [B, C, h, w] per re-noised step. Image-to-image passes the noised
        input ``x`` and the schedule and step it starts from (``img2img_schedule``)."""
        sched = sched or self.schedule(steps)
        if x is None:
            x = noise * sched.init_noise_sigma
        fused = uncond is not None and self._fuses_cfg(x)
        for i in range(start, sched.steps):
            t = sched.timesteps[i]
            fresh = step_noise[i - start] if i - start < len(step_noise) else None
            if fused and (fresh is not None or step_coefficients(sched, i)[2] == 0.0):
                x_in = x / (sched.sigmas[i] ** 2 + 1) ** 0.5 if sched.kind in ("euler", "euler_ancestral") else x
                x = self._fused_guided_step(sched, i, x, x_in, t, cond, uncond, consts, fresh)
            elif sched.kind in ("euler", "euler_ancestral"):
                sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
                out = self._predict(x / (sigma**2 + 1) ** 0.5, t, cond, uncond, consts)
                x0 = x0_from_model_output(out, x, sigma, sched.prediction_type)
                if sched.kind == "euler":
                    x = euler_step(x, x0, sigma, sigma_next)
                else:
                    x = euler_ancestral_step(x, x0, sigma, sigma_next, fresh)
            elif sched.kind == "consistency":
                out = self._predict(x, t, cond, uncond, consts)
                x, _ = consistency_step(out, x, sched.alphas[i], sched.alphas_next[i], sched.c_skip[i],
                                        sched.c_out[i], sched.prediction_type, fresh)
            else:  # flow
                v = self._predict(x, t, cond, uncond, consts)
                x = rectified_flow_step(x, v, sched.sigmas[i], sched.sigmas[i + 1], sched.flow_sign)
        return x

    @torch.no_grad()
    def denoise(self, cond: PromptEmbeds, generators: list[torch.Generator], height: int, width: int, steps: int,
                guidance_scale: float, uncond: PromptEmbeds | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0, nasa: NasaInput | None = None) -> torch.Tensor:
        """Sample clean latents [B, C, h, w] (fp32) for B images; generators[i] drives image i. ``init`` (uint8
        [B, H, W, 3]): image-to-image from these pictures at ``strength`` (see ``img2img_schedule``). ``nasa``:
        negative prompts steered away from in the cross-attention (guidance modes "nasa"; not together with CFG)."""
        if not self.uses_cfg(guidance_scale):
            uncond = None
        consts = self.conditioning(len(cond) * (2 if uncond is not None else 1), height, width, guidance_scale)
        if nasa is not None:
            consts.update(self.nasa_consts(nasa, len(cond), uncond is not None))
        if init is None:
            noise, step_noise = self.draw_noise(generators, height, width, steps)
            return self.denoise_latents(noise, step_noise, cond, uncond, steps, consts)
        sched, start = self.img2img_schedule(steps, strength)
        x0 = self.encode_image(init, generators)  # draws the VAE's posterior sample first, as diffusers does
        noise, step_noise = self.draw_noise(generators, height, width, sched.steps - start)
        x = self.add_noise(x0, noise, sched, start)
        return self.denoise_latents(noise, step_noise, cond, uncond, steps, consts, x, sched, start)

    # -- image-to-image (SDEdit) -------------------------------------------------------------------------------
    def img2img_schedule(self, steps: int, strength: float) -> tuple[Schedule, int]:
        """(schedule, index of its first step run) for image-to-image at ``strength`` in (0, 1].

        Euler / Euler-ancestral / DDIM-like schedules (SD-Turbo, SDXL-Turbo): what diffusers'
        StableDiffusionImg2ImgPipeline does. ``steps`` is the full schedule and only its last
        ``int(steps * strength)`` steps run, from the input noised to the first of them.

        Flow matching (our default models, FlowMatchEulerDiscreteScheduler, InstaFlow): the ``steps``-step schedule
        is scaled to start at sigma = ``strength`` (timesteps are sigma x 1000 there, so they scale with it) and every
        step runs, from ``x_s = (1 - s) x0 + s noise``. Truncating instead would let a 1- or 2-step model start only
        at sigma 1 or 0.5 (with 2 steps, strengths 0.5 to 0.99 would all give the same picture); scaling gives the
        exact noise level asked for at the cost the client chose.

        LCM (consistency) checkpoints: refused (diffusers' LCM img2img pipeline re-derives its skipping schedule
        from the strength; not implemented)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        sched = self.schedule(steps)
        if sched.kind == "flow":
            key = (steps, strength)
            if key not in self._schedules_i2i:
                self._schedules_i2i[key] = Schedule(
                    "flow", [t * strength for t in sched.timesteps], [s * strength for s in sched.sigmas],
                    1.0, sched.prediction_type, flow_sign=sched.flow_sign)
            return self._schedules_i2i[key], 0
        if sched.kind == "consistency":
            raise ValueError("image-to-image is not supported for LCM (consistency) checkpoints")
        run = self.img2img_steps(steps, strength)
        if run < 1:
            need = next((n for n in range(steps, MAX_STEPS + 1) if int(n * strength) >= 1), None)
            hint = (f"ask for num_inference_steps >= {need}" if need else "raise strength")
            raise ValueError(f"strength {strength:g} of {steps} step(s) runs no step (int(steps x strength) = 0); "
                             f"{hint}")
        return sched, steps - run

    def img2img_steps(self, steps: int, strength: float) -> int:
        """Denoiser steps image-to-image runs at (steps, strength)."""
        if self.sampler == "flow":
            return steps
        return min(int(steps * strength), steps)  # diffusers' get_timesteps, float rounding included

    def img2img_default_steps(self, strength: float) -> int:
        """``steps`` when an image-to-image request names none: the model's default number of steps actually
        run (for truncated schedules the smallest full schedule that runs that many, within MAX_STEPS)."""
        if self.sampler == "flow":
            return self.default_steps
        for n in range(self.default_steps, MAX_STEPS + 1):
            if int(n * strength) >= self.default_steps:
                return n
        return MAX_STEPS

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> clean latents x0 [B, C, h, w] fp32 on the device. Latent models: VAE encode and a
        posterior sample drawn from each image's generator (diffusers' ``retrieve_latents(..., generator)``), scaled
        as diffusers does (``(z - shift_factor) * scaling_factor``). Pixel-space models: the pixels in [-1, 1]."""
        # as diffusers' VaeImageProcessor: /255 in fp32, then 2x - 1
        img = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        img = 2.0 * img - 1.0  # [B, 3, H, W]
        if self.vae is None:
            return img
        vae_dtype = next(self.vae.parameters()).dtype
        # one image at a time, as diffusers encodes with a list of generators: a batched encode differs from a lone
        # one in the last float bits, which moved outputs by 1/255 between n=2 and n=1 at the same seed
        zs = []
        for i, g in enumerate(generators):
            enc = self.vae.encode(img[i: i + 1].to(vae_dtype))
            if hasattr(enc, "latent_dist"):  # AutoencoderKL: a posterior to sample
                dist = enc.latent_dist
                eps = torch.randn(dist.mean.shape, generator=g, dtype=torch.float32).to(self.device)
                zs.append(dist.mean.float() + dist.std.float() * eps)
            else:  # AutoencoderTiny (TAESD, --vae): deterministic latents, as diffusers' retrieve_latents takes them
                zs.append(enc.latents.float())
        z = torch.cat(zs)  # [B, C, h, w]
        cfg = self.vae.config
        if cfg.get("shift_factor") is not None:
            z = z - cfg.shift_factor
        return z * cfg.get("scaling_factor", 1.0)

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sched: Schedule, start: int) -> torch.Tensor:
        """x0 noised to the level of step ``start``: VE ``x0 + sigma noise`` (Euler family, diffusers' add_noise),
        flow ``(1 - s) x0 + s noise``."""
        s = sched.sigmas[start]
        if sched.kind == "flow":
            return (1.0 - s) * x0 + s * noise
        return x0 + s * noise

    def nasa_consts(self, nasa: NasaInput, rows: int, cfg: bool) -> dict[str, torch.Tensor]:
        """The denoiser inputs of NASA: negative text embeddings and the per-image scale alpha."""
        if self.nasa is None:
            raise ValueError("this model has no cross-attention for NASA (guidance modes: "
                             f"{', '.join(self.guidance_modes)})")
        if cfg:
            raise ValueError("NASA and CFG do not combine: a negative prompt goes to CFG at guidance_scale > 1")
        if len(nasa.negative) != rows or nasa.alpha.shape != (rows,):
            raise ValueError(f"NASA needs one negative row and one alpha per image ({rows})")
        if nasa.nag is not None and nasa.nag.shape != (rows, 3):
            raise ValueError(f"NAG needs one (phi, tau, alpha) row per image ({rows})")
        c = {"nasa_neg_embeds": nasa.negative.embeds, "nasa_alpha": nasa.alpha.to(self.device, torch.float32)}
        if nasa.nag is not None:
            c["nasa_nag"] = nasa.nag.to(self.device, torch.float32)
        if nasa.negative.mask is not None:
            c["nasa_neg_mask"] = nasa.negative.mask
        return c

    # -- stage 3 ---------------------------------------------------------------------------------------------
    def upcasts_vae(self, dtype: torch.dtype) -> bool:
        """Whether the VAE decodes in fp32 under an fp16 pipeline, following diffusers' own pipelines.

        The SDXL VAE overflows in fp16, and diffusers' SDXL pipeline upcasts when the config sets `force_upcast`.
        Its SD pipeline ignores the flag, which `AutoencoderKL` defaults to True whether or not the checkpoint
        asks for it: honouring it for SD-Turbo made our eager decode 27.9 ms against diffusers' 21.5 ms
        (H200, 512², docs/benchmarks.md), for a VAE that SD pipelines run in fp16 everywhere."""
        return (self.vae is not None and dtype == torch.float16 and self.family == "sdxl"
                and bool(self.vae.config.get("force_upcast", False)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images [B, H, W, 3] on the pipeline's device (graph-capturable)."""
        if self.vae is not None:
            cfg = self.vae.config
            z = latents / cfg.get("scaling_factor", 1.0)
            if cfg.get("shift_factor") is not None:
                z = z + cfg.shift_factor
            vae_dtype = next(self.vae.parameters()).dtype
            img = self.vae.decode(z.to(vae_dtype), return_dict=False)[0]
        else:
            img = latents  # pixel-space model: the sample already is the image in [-1, 1]
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    # -- convenience (tests, `fewstep generate`) ---------------------------------------------------------------
    def __call__(self, prompts: list[str], seeds: list[int], height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompts: list[str] | None = None, nasa_scale: float | None = None,
                 init: torch.Tensor | None = None, strength: float = 1.0, nag: NagParams | None = None) -> torch.Tensor:
        """Images [B, H, W, 3] uint8. Negative prompts go to CFG where the guidance scale runs it, else through NASA
        where the model has it (alpha ``nasa_scale``; with ``nag``, NAG's renormalised form instead), else nowhere
        (EngineCore refuses that case with a 400).
        ``init``: uint8 [B, H, W, 3] input images for image-to-image at ``strength``."""
        if init is not None:
            height, width = init.shape[1], init.shape[2]
        height = height or self.default_size
        width = width or self.default_size
        steps = steps or (self.default_steps if init is None else self.img2img_default_steps(strength))
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        self.check_size(height, width)
        cond = self.encode_prompt(prompts)
        uncond = nasa = None
        if self.uses_cfg(guidance_scale):
            uncond = self.negative_embeds(negative_prompts or [""] * len(prompts))
        elif negative_prompts and any(negative_prompts) and self.nasa is not None:
            scale = DEFAULT_NASA_SCALE if nasa_scale is None else nasa_scale
            nasa = NasaInput(self.negative_embeds(negative_prompts),
                             torch.tensor([scale if p else 0.0 for p in negative_prompts]),
                             NasaInput.nag_rows([nag if p else None for p in negative_prompts]))
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return self.decode(self.denoise(cond, gens, height, width, steps, guidance_scale, uncond, init=init,
                                        strength=strength, nasa=nasa)).cpu()
