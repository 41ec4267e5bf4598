"""In-process latency of fewstep's engine, per stage, against the plain diffusers pipeline on the same weights.

    fewstep bench pipeline --config benchmarks/configs/sd-turbo --size 512 --steps 1 \
        --batch 1 4 16 --iters 20 --baseline diffusers-eager --out benchmarks/results/pipeline.jsonl

Every figure is a median over ``--iters`` timed runs after ``--warmup`` untimed ones; GPU stages are bracketed by
synchronisation (the engine's own stage timer), so they are wall-clock device time. "cold" runs use a new prompt
every iteration (text encoder runs); "cached" runs repeat one prompt (the prompt-embedding cache serves it).
FLOPs come from torch.utils.flop_counter at batch 1; MFU is against the measured ceiling (--peak-tflops, 790 for
bf16/fp16 dense on our H200).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from fewstep.clients.bench import percentiles
from fewstep.clients.bench_util import git_commit  # noqa: F401 - also imported from here by image_encode_bench

STAGE_KEYS = ("encode_prompt_ms", "denoise_ms", "decode_ms", "encode_image_ms", "total_ms")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def count_flops(pipe, size: int, steps: int, guidance_scale: float | None = None) -> dict[str, float]:
    """GFLOPs per image for each stage at batch 1 (every denoiser pass counted: two a step under CFG)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with FlopCounterMode(display=False) as fc:
        cond = pipe.encode_prompt(["flop count"])
    out["encode_prompt"] = fc.get_total_flops() / 1e9
    gens = [torch.Generator().manual_seed(0)]
    g = 0.0 if guidance_scale is None else guidance_scale
    uncond = pipe.encode_prompt([""]) if pipe.uses_cfg(g) else None
    with FlopCounterMode(display=False) as fc:
        lat = pipe.denoise(cond, gens, size, size, steps, g, uncond)
    out["denoise"] = fc.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as fc:
        pipe.decode(lat)
    out["decode"] = fc.get_total_flops() / 1e9
    return out


def bench_fewstep(pipe, size, steps, batch, iters, warmup, cached: bool, fmt: str,
                  guidance_scale: float | None = None) -> dict:
    from fewstep.engines.config import BatchingConfig, EngineConfig
    from fewstep.engines.core import EngineCore, GenerateRequest

    # a benchmark picks its size: serve exactly that one, whatever the checkpoint declares
    core = EngineCore({"m": pipe}, EngineConfig(sizes=[(size, size)],
                                                batching=BatchingConfig(max_batch_size=max(batch, 1))))
    rows = []
    for i in range(warmup + iters):
        prompt = "a photo of a cat" if cached else f"a photo of a cat, variant {i} {time.time_ns()}"
        core.add_request(GenerateRequest(prompt=prompt, n=batch, height=size, width=size, steps=steps, seed=i,
                                         output_format=fmt, guidance_scale=guidance_scale))
        t0 = time.perf_counter()
        (out,) = core.step()
        wall = (time.perf_counter() - t0) * 1e3
        if out.error:
            raise out.error
        if i >= warmup:
            rows.append(dict(out.timings, wall_ms=wall))
    core.shutdown()
    p90, p99 = percentiles((r["wall_ms"] for r in rows), (90, 99))  # the definition `fewstep bench` reports use
    return {**{k: statistics.median(r[k] for r in rows) for k in (*STAGE_KEYS, "wall_ms")},
            "wall_p90_ms": p90, "wall_p99_ms": p99}


def bench_saturation(pipe, size, steps, batch, seconds: float, fmt: str, overlap: str, depth: int = 4) -> dict:
    """In-process throughput: the engine's own thread (as in the server) kept busy by ``depth`` requests of
    ``batch`` images each, cold prompts, for ``seconds`` after one second of settling; images/s answered."""
    from fewstep.engines.config import BatchingConfig, EngineConfig
    from fewstep.engines.core import EngineCore, GenerateRequest

    core = EngineCore({"m": pipe}, EngineConfig(sizes=[(size, size)], overlap_stages=overlap,
                                                batching=BatchingConfig(max_batch_size=batch,
                                                                        max_queue_seconds=None)))
    core.start()
    lock = threading.Lock()
    done_at: list[float] = []
    errors: list[BaseException] = []
    stop = time.perf_counter() + 1.0 + seconds
    counter = iter(range(10**9))

    def submit() -> None:
        i = next(counter)
        fut = core.add_request(GenerateRequest(prompt=f"a photo of a cat, variant {i} {time.time_ns()}", n=batch,
                                               height=size, width=size, steps=steps, seed=i, output_format=fmt))
        fut.add_done_callback(landed)

    def landed(fut) -> None:
        out = fut.result()
        with lock:
            if out.error:
                errors.append(out.error)
            done_at.append(time.perf_counter())
        if time.perf_counter() < stop and not errors:
            submit()

    t_begin = time.perf_counter()
    for _ in range(depth):
        submit()
    # after ``stop`` no request is submitted any more: wait for the last ``depth`` to land (or an error)
    while not errors and (time.perf_counter() < stop or core.num_waiting or core.images.num_running):
        if time.perf_counter() > stop + 120:
            raise TimeoutError("in-process saturation: requests still running 120 s after the window")
        time.sleep(0.05)
    core.shutdown()
    if errors:
        raise errors[0]
    window = [t for t in done_at if t_begin + 1.0 <= t <= stop]
    span = (max(window) - min(window)) if len(window) > 1 else float("nan")
    return {"images_per_s": round((len(window) - 1) * batch / span, 2) if len(window) > 1 else None,
            "batches": len(window), "seconds": round(seconds, 1)}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep bench pipeline`, built without side effects (tests parse recorded commands)."""
    p = argparse.ArgumentParser(prog="fewstep bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="benchmarks/configs/<arch>: a model built from this config with random weights "
                   "(speed only); one of --config or --model is needed")
    p.add_argument("--model", help="an existing checkpoint directory to time instead of --config")
    p.add_argument("--work", default="/tmp/fewstep-bench-models", help="where random checkpoints are built and cached "
                   "(default /tmp/fewstep-bench-models)")
    p.add_argument("--size", type=int, nargs="+", default=[512], help="square image sides in pixels; several make a "
                   "scaling curve (default 512)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps per image (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per request; each is timed "
                   "(default 1)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per measurement; the median is "
                   "reported (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before them (default 3)")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp", "raw"],
                   help="image encoding timed with each run; raw: none (default png)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cuda, cuda:1 or cpu (default auto: "
                   "CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights and activations (default auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--backend", nargs="+", default=["eager"], choices=["eager", "compiled"],
                   help="fewstep backends to time (default eager)")
    p.add_argument("--baseline", nargs="*", default=[], choices=["diffusers-eager", "diffusers-compile"],
                   help="plain diffusers pipelines on the same weights, in the same process (benchmarks/baselines.py; default none)")
    p.add_argument("--compile-mode", default=None, help="Inductor mode of the compiled backend (default: "
                   "CompileConfig's, default)")
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled backend: torch.compile each stage (--no-inductor: CUDA graphs of eager code only, "
                        "captured in seconds; default: CompileConfig's, on)")
    p.add_argument("--dynamic-batch", action="store_true", help="compiled backend: one symbolic-batch compile "
                   "serves every batch size (default off)")
    p.add_argument("--fuse-qkv", action="store_true", help="compiled backend: fused QKV projections (default off)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="compiled backend: cuDNN times its convolution "
                   "algorithms per shape at warm-up (rows labelled +cudnnb; default off)")
    p.add_argument("--fp8", action="store_true", help="compiled backend: the denoiser's linear layers in float8 "
                   "(torchao; compute capability 8.9+; rows labelled +fp8; default off)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled backend: channels-last UNet and VAE convolutions (default: CompileConfig's, on)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense fp16/bf16 ceiling that "
                   "MFU is computed against, TFLOP/s (default 790, measured on our H200)")
    p.add_argument("--vae", nargs="+", default=["own"],
                   help="decoders to time, each a full run of the fewstep backends: 'own' (the checkpoint's), a VAE "
                        "directory, or a VAE config folder (random weights, e.g. benchmarks/configs/taesd); rows of a "
                        "replaced decoder are labelled +vae:NAME (default own)")
    p.add_argument("--attention", nargs="+", default=["dense"],
                   help="self-attention options to time, each in its own rows (labelled +attn:NAME), e.g. dense "
                        "xformers (default dense: PyTorch SDPA); an option that cannot run here is reported and "
                        "skipped")
    p.add_argument("--saturate", type=float, default=0.0, metavar="SECONDS",
                   help="also measure in-process throughput for this long per batch size: the engine's own thread "
                        "(as in the server) kept busy by 4 requests of --batch images with cold prompts (default 0: "
                        "off)")
    p.add_argument("--overlap-stages", nargs="+", default=["off"], choices=["off", "on"],
                   help="--saturate: run with stages in sequence (off) and/or overlapped (on: the next batch is "
                        "enqueued while this one lands); rows labelled +overlap")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance scale of every request (default: the model's); above 1 a model without adapters "
                        "runs CFG (two denoiser passes a step)")
    p.add_argument("--adapters-rank", type=int, nargs="+", default=[0],
                   help="guidance adapters with random weights (speed only) of each rank, one full run per rank; "
                        "0: none, so guidance above 1 is CFG (default 0). With adapters, guidance above 1 takes one "
                        "pass a step (AGD). Rows are labelled +agd-rR")
    p.add_argument("--out", help="append result rows (JSON lines) to this file (default: "
                   "printed only)")
    return p


def resolve_vae(spec: str, work: Path, dtype: torch.dtype) -> Path | None:
    """'own' -> None; a config-only folder -> random weights saved under ``work``; else the directory itself."""
    if spec == "own":
        return None
    src = Path(spec)
    if any(src.glob("*.safetensors")):
        return src
    import diffusers

    cfg = json.loads((src / "config.json").read_text())
    out = work / f"vae-{src.name}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        getattr(diffusers, cfg["_class_name"]).from_config(cfg).to(dtype).save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    p = build_parser()
    a = p.parse_args()
    if a.config and any(Path(a.config).rglob("*.safetensors")):
        # random weights are built from configs only; a real checkpoint's own tokenizer would be replaced by a
        # generic one that its text encoder cannot embed (an IndexError deep in the flop counter)
        p.error(f"--config {a.config} holds weights: it is a checkpoint, pass it as --model {a.config}")

    from fewstep.benchmarks.random_weights import build_random_checkpoint
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if a.dtype == "auto" else getattr(torch, a.dtype)
    if a.model:
        model_dir = Path(a.model)
    else:
        t0 = time.perf_counter()
        model_dir = build_random_checkpoint(a.config, Path(a.work) / Path(a.config).name, dtype)
        print(f"random checkpoint at {model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    arch = Path(a.config or a.model).name

    meta = {"gpu": device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "arch": arch, "steps": a.steps,
            "guidance_scale": a.guidance_scale,
            "dtype": str(dtype).removeprefix("torch."), "command": "fewstep bench pipeline " +
            " ".join(os.sys.argv[1:])}
    rows = []

    def emit(row: dict) -> None:
        # Written as produced: a run cut short by its time limit still leaves every finished row behind.
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for vae_spec, rank, attention in [(v, r, at) for v in a.vae for r in a.adapters_rank for at in a.attention]:
        vae_dir = resolve_vae(vae_spec, Path(a.work), dtype)
        t0 = time.perf_counter()
        try:
            pipe = FewStepPipeline(load_checkpoint(model_dir, device, dtype, vae=vae_dir), device, dtype, attention)
        except ValueError as e:  # e.g. xformers missing or built for another torch: say so, time the rest
            print(f"attention {attention}: cannot run here: {e}", flush=True)
            emit(dict(meta, system=f"fewstep+attn:{attention}", batch=None, error=str(e), kind="unavailable"))
            continue
        if rank:
            from fewstep.engines.adapters import random_adapters

            pipe.adapters = random_adapters(pipe.denoiser, rank)
            pipe.denoiser.to(device, dtype)  # the new adapter weights join the model's device and dtype
        load_s = time.perf_counter() - t0
        flops = {}
        for size in a.size:
            flops[size] = count_flops(pipe, size, a.steps, a.guidance_scale)
            print(f"loaded in {load_s:.1f} s (VAE {vae_spec}, adapters rank {rank}); {size}² GFLOPs/image: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in flops[size].items()), flush=True)
        suffix = ("" if vae_dir is None else f"+vae:{Path(vae_spec).name}") + (f"+agd-r{rank}" if rank else "") + (
            "" if attention == "dense" else f"+attn:{attention.split('(')[0]}")
        _bench_backends(a, pipe, flops, device, meta, emit, suffix)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _bench_baselines(a, model_dir, dtype, device, meta, emit)
    _print_table(rows)


def _bench_backends(a, pipe, flops, device, meta, emit, suffix: str) -> None:
    for backend in a.backend:
        runner, compile_s = pipe, None
        if backend == "compiled":
            from fewstep.engines.backends.compiled import CompiledPipeline
            from fewstep.engines.config import CompileConfig

            # options left unset on the command line keep CompileConfig's defaults
            extra = {k: v for k, v in dict(compile=a.inductor, mode=a.compile_mode, channels_last=a.channels_last,
                                           fuse_qkv=a.fuse_qkv, dynamic_batch=a.dynamic_batch,
                                           fp8=a.fp8 or None, cudnn_benchmark=a.cudnn_benchmark or None).items()
                     if v is not None}
            try:
                runner = CompiledPipeline(pipe, CompileConfig(batch_buckets=a.batch, steps=[a.steps],
                                                              sizes=[(s, s) for s in a.size], **extra))
                compile_s = runner.warmup(progress=True).total
            except Exception:  # report it and still time the other systems
                import traceback

                traceback.print_exc()
                print("compiled backend FAILED; skipping it", flush=True)
                continue
            print(f"compiled backend: compile + capture {compile_s:.1f} s", flush=True)
        for size in a.size:
            total_gflop = sum(flops[size].values())
            for batch in a.batch:
                for cached in (False, True):
                    r = bench_fewstep(runner, size, a.steps, batch, a.iters, a.warmup, cached, a.format,
                                      a.guidance_scale)
                    gpu_ms = r["encode_prompt_ms"] + r["denoise_ms"] + r["decode_ms"]
                    mfu = (total_gflop * batch / (gpu_ms * 1e-3) / (a.peak_tflops * 1e3)
                           if device.type == "cuda" else None)
                    label = f"fewstep-{backend}"
                    if backend == "compiled":  # the options actually used (+cl), whatever the default at the time
                        c = runner.cfg
                        label += ("+fqkv" if c.fuse_qkv else "") + ("+fp8" if c.fp8 else "") + (
                            "+cudnnb" if c.cudnn_benchmark else "") + (
                            "+cl" if c.channels_last else "") + (
                            "+dyn" if c.dynamic_batch else "") + ("" if c.compile else "+graphs-only")
                    label += suffix
                    emit(dict(meta, size=size, system=label, batch=batch,
                              prompt="cached" if cached else "cold", **{k: round(v, 3) for k, v in r.items()},
                              gflops_per_image=round(total_gflop, 1), mfu=None if mfu is None else round(mfu, 4),
                              compile_s=compile_s))
                if a.saturate > 0:
                    for overlap in a.overlap_stages:
                        r = bench_saturation(runner, size, a.steps, batch, a.saturate, a.format, overlap)
                        print(f"{label}{'+overlap' if overlap == 'on' else ''} batch {batch}: "
                              f"{r['images_per_s']} images/s in-process", flush=True)
                        emit(dict(meta, size=size, system=label + ("+overlap" if overlap == "on" else ""),
                                  batch=batch, prompt="cold", kind="saturation", **r))
        del runner


def _bench_baselines(a, model_dir, dtype, device, meta, emit) -> None:
    from fewstep.benchmarks.baselines import bench_diffusers

    for size in a.size:  # batch outermost: if a time limit cuts the run, both baselines at batch 1 are in
        for batch in a.batch:
            for base in a.baseline:
                r = bench_diffusers(model_dir, dtype, device, size, a.steps, batch, a.iters, a.warmup,
                                    compiled=base == "diffusers-compile")
                emit(dict(meta, size=size, system=base, batch=batch, prompt="cold", **r))


def _print_table(rows: list[dict]) -> None:
    rows = [r for r in rows if r.get("kind") not in ("saturation", "unavailable")]  # printed as measured
    width = max([18] + [len(r["system"]) + 1 for r in rows])
    print(f"\n{'system':<{width}}{'size':>6}{'batch':>6}{'prompt':>8}{'enc_prompt':>11}{'denoise':>9}{'decode':>8}{'enc_img':>8}"
          f"{'total ms':>10}{'MFU':>7}")
    def mfu_s(r):
        return f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"

    for r in rows:
        f = lambda k: f"{r[k]:.1f}" if r.get(k) is not None else "-"
        print(f"{r['system']:<{width}}{r['size']:>6}{r['batch']:>6}{r['prompt']:>8}{f('encode_prompt_ms'):>11}{f('denoise_ms'):>9}"
              f"{f('decode_ms'):>8}{f('encode_image_ms'):>8}{f('total_ms'):>10}"
              f"{mfu_s(r):>7}")


if __name__ == "__main__":
    main()
