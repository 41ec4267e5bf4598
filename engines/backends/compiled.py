"""The `compiled` backend: torch.compile plus CUDA graphs, wrapped around an eager FewStepPipeline from outside.

Each pipeline stage has a device-only function (``encode_tokens``, ``denoise_latents``, ``decode``). For every
declared shape bucket (batch size in ``batch_buckets`` x resolution in ``sizes`` x step count in ``steps``) this
backend compiles that function with Inductor (no Inductor CUDA graphs: we capture our own) and captures one CUDA
graph per stage. A request runs as: host-side tokenisation and noise draws -> copies into the bucket's static
inputs -> graph replays. A batch is padded up to its bucket; padded rows are computed and thrown away.

Why three graphs rather than one: the prompt cache must be able to skip the text encoder, and the engine reports
each stage's time. Replays are back to back, so the extra cost is three launches instead of one.

Shapes outside the declared buckets run on the eager pipeline (logged once per shape), so a request is never
refused for being unusual; it is only slower.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo  # noqa: F401  (StaticGraph marks dynamic dims)

from ..pipeline import FewStepPipeline, NasaInput, PromptEmbeds
from ..runner import Capabilities

log = logging.getLogger("fewstep.engines")


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dict/list/PromptEmbeds of tensors -> flat {path: tensor} (None leaves are dropped)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, PromptEmbeds):
        obj = {"embeds": obj.embeds, "mask": obj.mask, "pooled": obj.pooled}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj or [])
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        if v is not None:
            out.update(_flatten(v, f"{prefix}/{k}"))
    return out


def _embeds(flat: dict[str, torch.Tensor], prefix: str) -> PromptEmbeds | None:
    if f"{prefix}/embeds" not in flat:
        return None
    return PromptEmbeds(flat[f"{prefix}/embeds"], flat.get(f"{prefix}/mask"), flat.get(f"{prefix}/pooled"))


def _pad_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Pad dim 0 to n rows by repeating the last row (keeps embeddings and masks realistic)."""
    if t is None or t.shape[0] == n:
        return t
    return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


def quantize_fp8(model: torch.nn.Module, device: torch.device, min_features: int = 256) -> int:
    """``CompileConfig.fp8``: torchao's float8 dynamic quantisation (per-row scales for activations and weights) on
    the model's linear layers whose sides are multiples of 16 (what the fp8 GEMMs take) and at least ``min_features``
    wide (below, quantising the activation costs more than the GEMM saves). Returns how many layers changed; raises
    ValueError saying what to do where it cannot run."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "the CPU" if device.type != "cuda" else f"compute capability {torch.cuda.get_device_capability(device)}"
        raise ValueError(f"fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); this is {where}: "
                         "leave fp8 off")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise ValueError("fp8 needs torchao (pip install 'fewstep[fp8]'); leave fp8 off") from e

    def eligible(m: torch.nn.Module, _name: str) -> bool:
        return (isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0
                and min(m.in_features, m.out_features) >= min_features)

    n = sum(1 for name, m in model.named_modules() if eligible(m, name))
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
    return n


class StaticGraph:
    """A function of a flat dict of tensors, captured once into a CUDA graph (or just called on the CPU)."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], Any], example: dict[str, torch.Tensor],
                 cuda_graph: bool, pool=None, warmup: int = 2, dynamic_rows: tuple[int, ...] = ()):
        self.fn = fn
        self.static = {k: v.clone() for k, v in example.items()}
        for v in self.static.values():
            # Batch-sized inputs get a symbolic dim 0, so the compiled code of one bucket serves the others;
            # maybe_mark_dynamic (not mark_dynamic): where the model specialises on it, Dynamo may say no.
            if v.dim() and v.shape[0] in dynamic_rows:
                torch._dynamo.maybe_mark_dynamic(v, 0)
        self.graph = None
        if cuda_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):  # compiles, autotunes and allocates outside the capture
                    fn(self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
                self.out = fn(self.static)
        else:
            with torch.no_grad():
                fn(self.static)

    def __call__(self, inputs: dict[str, torch.Tensor]):
        for k, v in inputs.items():
            self.static[k].copy_(v)
        if self.graph is None:
            with torch.no_grad():
                return self.fn(self.static)
        self.graph.replay()
        return self.out


@dataclass
class CompileReport:
    seconds: dict[str, float] = field(default_factory=dict)  # bucket -> compile + capture seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class CompiledPipeline:
    """The compiled ``Runner`` (engines/runner.py): the eager pipeline's stages, backed by compiled, captured graphs
    per declared bucket. Everything else (sizes it can run, CFG, defaults) is the eager pipeline's."""

    def __init__(self, pipe: FewStepPipeline, cfg):
        self.pipe = pipe
        self.cfg = cfg
        self.device = pipe.device
        self.cuda_graphs = cfg.cuda_graphs and pipe.device.type == "cuda"
        self.batch_buckets = sorted(set(cfg.batch_buckets))
        self.sizes = [tuple(s) for s in (cfg.sizes or [(pipe.default_size, pipe.default_size)])]
        self.steps = list(cfg.steps or [pipe.default_steps])
        self.report = CompileReport()
        self._graphs: dict[tuple, StaticGraph] = {}
        # (height, width, steps) -> {bucket: seconds}, timed at warm-up on a GPU; see batch_plan
        self.batch_costs: dict[tuple[int, int, int], dict[int, float]] = {}
        self._warned: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        if cfg.cache_dir:
            # Inductor's FX-graph and autotuning caches persist here, so a restart skips most compilation.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.cache_dir).expanduser()))
        if cfg.fuse_qkv and hasattr(pipe.denoiser, "fuse_qkv_projections"):
            pipe.denoiser.fuse_qkv_projections()
        if cfg.cudnn_benchmark and pipe.device.type == "cuda":
            # the VAE decoder and the UNet are convolutions; StaticGraph's warm-up runs (outside the capture) pay
            # the per-shape timing, so no capture ever waits for it
            torch.backends.cudnn.benchmark = True
        if cfg.fp8:
            n = quantize_fp8(pipe.denoiser, pipe.device)
            log.info("compiled backend: %d linear layers of the denoiser in float8", n)
        if cfg.channels_last:
            # 2-D convolutions only (the 4-D weights `module.to(memory_format=...)` would convert): NHWC has no
            # 5-D form, so a video VAE's Conv3d would raise, and a DiT's linear layers have no layout to change.
            # Inductor then keeps activations NHWC between convolutions.
            conv2d = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
            for module in (pipe.denoiser, pipe.vae):
                for conv in (m for m in (module.modules() if module is not None else ()) if isinstance(m, conv2d)):
                    conv.to(memory_format=torch.channels_last)
        import torch._dynamo as dynamo  # a bare `import torch._dynamo` here would make `torch` local to __init__

        # One compiled graph per bucket and stage: raise the recompile limit above the number of buckets.
        limit = 4 * len(self.batch_buckets) * len(self.sizes) * len(self.steps)
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), limit))
        # dynamic=False always: no automatic dynamic shapes (a second size or model would make H and W symbolic);
        # with dynamic_batch, StaticGraph's explicit marks make the batch dim, and only it, symbolic
        wrap = (lambda f: torch.compile(f, mode=cfg.mode, dynamic=False)) if cfg.compile else (lambda f: f)
        self._encode_fn = wrap(lambda flat: _flatten(pipe.encode_tokens(
            {k.removeprefix("/"): v for k, v in flat.items()})))
        self._decode_fn = wrap(lambda flat: pipe.decode(flat["/latents"]))
        self._denoise_fns: dict[int, Callable] = {}
        for steps in self.steps:
            def fn(flat, steps=steps):
                noise_steps = pipe.noise_steps(steps)
                step_noise = [flat[f"/step_noise/{i}"] for i in range(noise_steps)]
                consts = {k.removeprefix("/consts/"): v for k, v in flat.items() if k.startswith("/consts/")}
                return pipe.denoise_latents(flat["/noise"], step_noise, _embeds(flat, "/cond"),
                                            _embeds(flat, "/uncond"), steps, consts)
            self._denoise_fns[steps] = wrap(fn)

    # -- Runner: what the eager pipeline decides ---------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.pipe.capabilities, backend="compiled")

    @property
    def compile_seconds(self) -> float:
        return self.report.total

    def check_size(self, height: int, width: int) -> None:
        self.pipe.check_size(height, width)  # undeclared sizes still run (eagerly), so only the model's rule

    def uses_cfg(self, guidance_scale: float) -> bool:
        return self.pipe.uses_cfg(guidance_scale)

    # -- buckets ---------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= n), None)

    def batch_plan(self, n: int, height: int, width: int, steps: int) -> list[int]:
        """Rows per sub-batch for ``n`` waiting images (EngineCore runs the first and leaves the rest waiting).
        One padded bucket unless warm-up timed the buckets of this shape (``batch_costs``)."""
        costs = self.batch_costs.get((height, width, steps)) if self.cfg.split_batches else None
        return cheapest_split(n, costs) if costs else [n]

    def _time_buckets(self) -> None:
        """Time each captured bucket end to end (prompt, denoise, decode; median of 3) per declared size and step
        count, for ``batch_plan``. Measured, not modelled: whether 2 images are cheaper as 1+1 or padded to 4
        depends on the GPU, the model and the size."""
        pipe = self.pipe
        for (h, w), steps in ((hw, s) for hw in self.sizes for s in self.steps):
            costs = {}
            for b in self.batch_buckets:
                runs = []
                for r in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    self._run_bucket(b, h, w, steps, pipe.default_guidance, f"timing {r}")
                    torch.cuda.synchronize()
                    runs.append(time.perf_counter() - t0)
                costs[b] = sorted(runs)[1]
            self.batch_costs[(h, w, steps)] = costs
            log.info("compiled backend: bucket costs at %dx%d, %d step(s): %s", w, h, steps,
                     ", ".join(f"{b}: {1e3 * c:.1f} ms" for b, c in costs.items()))

    def _run_bucket(self, b: int, h: int, w: int, steps: int, guidance: float, tag: str) -> None:
        """One synthetic batch of ``b`` images through every stage (warm-up capture, bucket timing)."""
        cond = self.encode_prompt([f"{tag} {i}" for i in range(b)])
        uncond = self.negative_embeds([""] * b) if self.pipe.uses_cfg(guidance) else None
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        self.decode(self.denoise(cond, gens, h, w, steps, guidance, uncond))

    def _graph(self, key: tuple, fn: Callable, example: dict[str, torch.Tensor]) -> StaticGraph:
        g = self._graphs.get(key)
        if g is None:
            t0 = time.perf_counter()
            b = key[1]
            rows = (b, 2 * b) if self.cfg.compile and self.cfg.dynamic_batch and b > 1 else ()
            g = self._graphs[key] = StaticGraph(fn, example, self.cuda_graphs, self._pool, dynamic_rows=rows)
            self.report.seconds["/".join(map(str, key))] = time.perf_counter() - t0
        return g

    def _fallback(self, key: tuple) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("compiled backend: no bucket for %s; running it eagerly (declare it at start-up)", key)

    # -- stages (same signatures as FewStepPipeline) ---------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds:
        b = self._bucket(len(prompts))
        if b is None:
            self._fallback(("encode", len(prompts)))
            return self.pipe.encode_prompt(prompts)
        # the prompts as the model reads them (the checkpoint's prompt completion), as the eager encode_prompt does
        completed = [self.pipe.complete_prompt(p) for p in prompts]
        tok = self.pipe.tokenize(completed + [completed[-1]] * (b - len(prompts)))
        flat = {f"/{k}": v for k, v in tok.items()}
        out = self._graph(("encode", b), self._encode_fn, flat)(flat)
        n = len(prompts)
        # clone: the graph's output buffers are overwritten by the next replay, and the prompt cache keeps rows
        return PromptEmbeds(*(None if out.get(f"/{k}") is None else out[f"/{k}"][:n].clone()
                              for k in ("embeds", "mask", "pooled")))

    def negative_embeds(self, negative_prompts: list[str]) -> PromptEmbeds:
        return self.pipe.negative_embeds(negative_prompts)

    def img2img_schedule(self, steps: int, strength: float):
        return self.pipe.img2img_schedule(steps, strength)

    def img2img_steps(self, steps: int, strength: float) -> int:
        return self.pipe.img2img_steps(steps, strength)

    def img2img_default_steps(self, strength: float) -> int:
        return self.pipe.img2img_default_steps(strength)

    @torch.no_grad()
    def denoise(self, cond: PromptEmbeds, generators: list[torch.Generator], height: int, width: int, steps: int,
                guidance_scale: float, uncond: PromptEmbeds | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0, nasa: NasaInput | None = None) -> torch.Tensor:
        pipe = self.pipe
        if init is not None:  # image-to-image runs eager: its graphs would be one more per strength
            return pipe.denoise(cond, generators, height, width, steps, guidance_scale, uncond, init=init,
                                strength=strength, nasa=nasa)
        if not pipe.uses_cfg(guidance_scale):
            uncond = None
        n = len(generators)
        b = self._bucket(n)
        # with guidance adapters, a scale above 1 adds the adapters' scale input: a graph of its own (AGD)
        agd = pipe.adapters is not None and guidance_scale > 1.0
        key = ("denoise", b, height, width, steps, uncond is not None) + (("agd",) if agd else ())
        # NASA batches (negative conditioning in the cross-attention) run eager: the graphs hold the plain pass
        if nasa is not None or b is None or (height, width) not in self.sizes or steps not in self._denoise_fns:
            self._fallback(key + (("nasa",) if nasa is not None else ()))
            return pipe.denoise(cond, generators, height, width, steps, guidance_scale, uncond, nasa=nasa)
        noise, step_noise = pipe.draw_noise(generators, height, width, steps)
        pad = lambda e: None if e is None else PromptEmbeds(_pad_rows(e.embeds, b), _pad_rows(e.mask, b),
                                                            _pad_rows(e.pooled, b))
        consts = pipe.conditioning(b * (2 if uncond is not None else 1), height, width, guidance_scale)
        flat = _flatten({"noise": _pad_rows(noise, b), "step_noise": [_pad_rows(s, b) for s in step_noise],
                         "cond": pad(cond), "uncond": pad(uncond), "consts": consts})
        out = self._graph(key, self._denoise_fns[steps], flat)(flat)
        return out[:n].clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        b = self._bucket(n)
        key = ("decode", b, *latents.shape[1:])
        if b is None:
            self._fallback(key)
            return self.pipe.decode(latents)
        flat = {"/latents": _pad_rows(latents, b)}
        return self._graph(key, self._decode_fn, flat)(flat)[:n].clone()

    # -- start-up --------------------------------------------------------------------------------------------
    def warmup(self, progress: bool = True) -> CompileReport:
        """Compile and capture every declared bucket now, so /ready means every declared shape is fast."""
        from tqdm import tqdm

        pipe = self.pipe
        # the guidance scales whose graphs differ: the model's default, and above 1 either CFG's doubled batch (when
        # the default already guides) or the adapters' one pass
        guidances = [pipe.default_guidance]
        if pipe.uses_cfg(pipe.default_guidance) or (pipe.adapters is not None and pipe.default_guidance <= 1.0):
            guidances.append(max(pipe.default_guidance, 2.0))
        jobs = [(b, hw, s, g) for b in self.batch_buckets for hw in self.sizes for s in self.steps for g in guidances]
        t0 = time.perf_counter()
        for b, (h, w), steps, guidance in tqdm(jobs, desc="compiling buckets", disable=not progress, unit="bucket"):
            self._run_bucket(b, h, w, steps, guidance, "warm-up")
        if self.cuda_graphs:
            torch.cuda.synchronize()
        log.info("compiled backend: %d buckets ready in %.1f s (compile + capture)", len(jobs),
                 time.perf_counter() - t0)
        if self.cfg.split_batches and self.cuda_graphs and len(self.batch_buckets) > 1:
            self._time_buckets()
        return self.report


def cheapest_split(n: int, costs: dict[int, float]) -> list[int]:
    """Rows per sub-batch that cover ``n`` rows at the least total cost, each sub-batch padded to its bucket
    (``costs``: bucket -> seconds). Smallest first: run back to back, the short ones finish, and answer, early.

    Unbounded knapsack over n (at most max_batch_size, so tiny): best[k] = min_b costs[b] + best[k - b]."""
    if n <= 0:
        return []
    best, pick = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for k in range(1, n + 1):
        for b, c in costs.items():
            total = c + best[max(0, k - b)]
            if total < best[k] or (total == best[k] and b > pick[k]):  # ties: fewer, larger launches
                best[k], pick[k] = total, b
    rows, k = [], n
    while k > 0:
        rows.append(min(pick[k], k))
        k -= pick[k]
    return sorted(rows)
