"""fewstep command line: serve | generate | bench | build | train.

``bench`` and ``train`` also run the tools of ``fewstep.benchmarks`` and ``fewstep.training``, each with its own
arguments (``fewstep bench pipeline --help``). They run from the installed package: never as ``python -m
benchmarks...`` from the repository root, whose ``kernels/`` folder would shadow PyPI's ``kernels`` package."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import uvicorn

# `fewstep generate -o FILE`: the file's extension picks the encoding; a name without one is written as PNG
OUTPUT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _common_model_args(p: argparse.ArgumentParser, serve: bool = False) -> None:
    p.add_argument("--model", help="diffusers-format model directory, or an embedded model: default (image) or "
                   "default-video" + ("; without it, both embedded models (images and streams)" if serve else
                                      "; without it, default"))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                   help="where the model runs (default auto: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None,
                   help="weights and activations (default auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--vae", default=None, help="a diffusers VAE directory that replaces the image model's decoder: "
                   "AutoencoderKL, or AutoencoderTiny (TAESD's format, faster)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="guidance adapters (AGD-style; config.json + diffusion_pytorch_model.safetensors) for the "
                        "image model: guidance_scale > 1 then runs one pass instead of CFG's two (default: an "
                        "adapters/ folder beside the checkpoint's components, if any)")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,16, got {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,4,16, got {text!r}")
    return out


def _size_list(text: str) -> list[tuple[int, int]]:
    """'512x512,1024x768' (WxH, as in the API) -> [(512, 512), (768, 1024)] as (height, width)."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 512x512,1024x1024 (WxH), got {part!r}")
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {part!r}")
        out.append((h, w))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one size such as 512x512")
    return out


def _one_size(text: str) -> tuple[int, int]:
    """'512x768' (WxH) -> (768, 512) as (height, width)."""
    sizes = _size_list(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one size such as 512x512 (WxH), got {text!r}")
    return sizes[0]


def _serve_config(args):
    """`fewstep serve`'s flags over the environment and the defaults."""
    from .config import load_config

    return load_config(_serve_overrides(args))


def _serve_overrides(args) -> dict:
    """`fewstep serve`'s flags as ServerConfig paths (None: not given)."""
    return {"model": args.model, "model_name": args.model_name, "engine.device": args.device,
            "engine.dtype": args.dtype, "engine.vae": args.vae, "engine.adapters": args.adapters,
            "http.host": args.host, "http.port": args.port,
            "engine.batching.max_batch_size": args.max_batch_size,
            "engine.batching.max_wait_ms": args.max_wait_ms,
            "engine.batching.max_queue_seconds": args.max_queue_seconds, "engine.attention": args.attention,
            "engine.backend": args.backend, "engine.threads": args.threads, "engine_process": args.engine_process,
            "engine.overlap_stages": args.overlap_stages, "engine.stream.overlap_decode": args.overlap_decode,
            "engine.stream.max_sessions": args.max_sessions,
            "engine.stream.max_batch_sessions": args.max_batch_sessions,
            "engine.stream.outbox_chunks": args.outbox_chunks,
            "engine.stream.ramp": args.stream_ramp,
            "engine.compiled.batch_buckets": args.compile_buckets,
            "engine.compiled.stream_buckets": args.compile_stream_buckets,
            "engine.sizes": args.sizes,
            "engine.compiled.sizes": args.compile_sizes, "engine.compiled.mode": args.compile_mode,
            "engine.compiled.dynamic_batch": args.compile_dynamic_batch, "engine.compiled.fp8": args.compile_fp8,
            "engine.compiled.cudnn_benchmark": args.compile_cudnn_benchmark,
            "engine.compiled.channels_last": args.compile_channels_last,
            "limits.max_n": args.max_n, "limits.max_side": args.max_side,
            "limits.max_prompt_chars": args.max_prompt_chars,
            "http.shutdown_grace_s": args.shutdown_grace,
            "security.api_keys": args.api_key, "security.allow_origins": args.allow_origin,
            "security.cors_origins": args.cors_origin, "security.protect_metrics": args.protect_metrics,
            "security.max_streams_per_client": args.max_streams_per_client,
            "security.requests_per_second": args.rate_limit,
            "security.idle_timeout_s": args.idle_timeout}


def _serve(args) -> int:
    from .app import create_app
    from .state import ConfigError

    cfg = _serve_config(args)
    models = cfg.served_models()  # fail fast, with a one-line message, before the server starts
    tuning = (args.target_ongoing_requests, args.upscale_delay, args.downscale_delay)
    if args.replicas is not None or args.max_replicas is not None or any(v is not None for v in tuning):
        if cfg.engine_process:
            print("fewstep: --engine-process and --replicas do not combine yet (each Ray Serve replica runs its "
                  "engine in-process); drop one", file=sys.stderr)
            return 2
        return _serve_ray(args, cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(cfg)
    except ConfigError as e:
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    if not cfg.security.api_keys and cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("fewstep.server").warning(
            "serving on %s without API keys: anyone who reaches this address can use it (pass --api-key)",
            cfg.http.host)
    http = cfg.http
    config = uvicorn_config(app, http, cfg.limits)
    print(f"fewstep: serving {', '.join(name for name, _ in models)} on http://{http.host}:{http.port} "
          f"({', '.join(server_stack(config))})", flush=True)
    DrainingServer(config, app.state.guard, http.shutdown_grace_s).run()
    return 0


def ws_max_size(http, limits=None) -> int:
    """uvicorn's ws_max_size: a control message (``http.ws_max_bytes``) plus, where ``limits`` is given, room for
    one input image base64-encoded, so an image just over ``limits.max_image_bytes`` gets the route's own error and
    the socket stays open."""
    if limits is None:
        return http.ws_max_bytes
    return http.ws_max_bytes + 4 * math.ceil(limits.max_image_bytes / 3)


def _serve_ray(args, cfg) -> int:
    """`fewstep serve --replicas N`: the same app, N times, behind Ray Serve's proxy (server/ray.py)."""
    from pydantic import ValidationError

    try:
        from .ray import RayAppConfig, run
    except ImportError as e:
        print(f"fewstep: --replicas needs Ray Serve ({e}); pip install 'fewstep[ray]'", file=sys.stderr)
        return 2
    server = {k: v for k, v in _serve_overrides(args).items() if v is not None and not k.startswith("http.")}
    for key in ("model", "engine.vae"):  # replicas run in other directories (and on other hosts: same paths there)
        if key in server and Path(server[key]).exists():
            server[key] = str(Path(server[key]).resolve())
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {"min_replicas": args.replicas if args.replicas is not None else 1,
                       "max_replicas": args.max_replicas}
        tuned = {"target_ongoing_requests": args.target_ongoing_requests, "upscale_delay_s": args.upscale_delay,
                 "downscale_delay_s": args.downscale_delay}
        autoscaling.update({k: v for k, v in tuned.items() if v is not None})
    elif any(v is not None for v in (args.target_ongoing_requests, args.upscale_delay, args.downscale_delay)):
        print("fewstep: --target-ongoing-requests, --upscale-delay and --downscale-delay tune the autoscaler: add "
              "--max-replicas N", file=sys.stderr)
        return 2
    try:
        options = RayAppConfig(server=server, replicas=1 if autoscaling or args.replicas is None else args.replicas,
                               autoscaling=autoscaling)
    except ValidationError as e:  # one line per refused option, e.g. "replicas: Input should be >= 1"
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "options"
            print(f"fewstep: --replicas/--max-replicas: {where}: {err['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.security.api_keys and cfg.http.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("fewstep.server").warning(
            "serving on %s without API keys: anyone who reaches this address can use it (pass --api-key, or set "
            "FEWSTEP_API_KEYS on every node)", cfg.http.host)
    return run(options, cfg.http.host, cfg.http.port, args.ray_address)


def uvicorn_config(app, http, limits=None) -> uvicorn.Config:
    """uvicorn's settings for ``fewstep serve`` (``http``: HttpConfig): uvloop and httptools where installed
    (``uvicorn[standard]``), else asyncio and h11. loop "auto" is uvicorn's own choice; the parser is httptools with
    the request-head limit that uvicorn enforces only under h11 (server/head_limit.py)."""
    try:
        from .head_limit import BoundedHttpToolsProtocol as parser
    except ImportError:  # no httptools here: h11, which enforces max_header_bytes itself
        parser = "h11"
    return uvicorn.Config(app, host=http.host, port=http.port, log_level=http.log_level, loop="auto", http=parser,
                          ws_max_size=ws_max_size(http, limits), h11_max_incomplete_event_size=http.max_header_bytes,
                          limit_concurrency=http.max_connections,
                          timeout_graceful_shutdown=max(1, math.ceil(http.shutdown_grace_s)))


def server_stack(config: uvicorn.Config) -> tuple[str, str]:
    """(event loop, HTTP parser) that ``config`` runs on, e.g. ("uvloop", "httptools"), as uvicorn resolves them."""
    if not config.loaded:
        config.load()
    factory = config.get_loop_factory()
    loop = (getattr(factory, "__module__", None) or "asyncio").split(".")[0]
    parser = config.http_protocol_class.__module__.rsplit(".", 1)[-1].removesuffix("_impl")
    return loop, "httptools" if parser == "head_limit" else parser


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded, orderly shutdown. At the first SIGTERM/SIGINT the guard drains (new work
    refused, streams end with 'stopped' and close 1001, MJPEG responses end); in-flight requests then get ``grace``
    seconds (uvicorn's timeout_graceful_shutdown) before they are cancelled; and a watchdog ends the process
    ``grace`` + 5 s after the signal whatever still runs (an engine step on a large batch cannot be interrupted).
    A second signal exits at once."""

    QUIET_S = 0.1

    def __init__(self, config: uvicorn.Config, guard, grace: float):
        super().__init__(config)
        self.guard, self.grace = guard, grace

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            os.write(2, b"fewstep: second signal, exiting now\n")
            os._exit(1)
        super().handle_exit(sig, frame)
        self.guard.draining = True  # refuse new work from now, not from uvicorn's next tick (up to 0.1 s later)
        watchdog = threading.Timer(self.grace + 5.0, _exit_late, (self.grace + 5.0,))
        watchdog.daemon = True
        watchdog.start()

    async def shutdown(self, sockets=None) -> None:
        # The listener stays open while in-flight work finishes: a client that connects meanwhile is answered 503
        # by the draining guard. Closing it first would reset the connections already in the kernel's accept
        # backlog (the client sees a connection reset, not an answer).
        # It closes after a quiet moment (no request running for QUIET_S), so that a client racing the close on a
        # kept-alive connection is rare; every answer meanwhile carries Connection: close (the guard).
        t0 = time.monotonic()
        await self.guard.drain(wait_s=min(3.0, self.grace))
        quiet_since = None
        while time.monotonic() - t0 < self.grace:
            now = time.monotonic()
            if self.server_state.tasks:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= self.QUIET_S:
                break
            await asyncio.sleep(0.01)
        # what is left of the grace bounds uvicorn's own wait for the connections it then closes
        self.config.timeout_graceful_shutdown = max(0.1, self.grace - (time.monotonic() - t0))
        await super().shutdown(sockets)


def _exit_late(after: float) -> None:
    logging.getLogger("fewstep.server").error("shutdown still running %.0f s after the signal; exiting", after)
    logging.shutdown()
    os._exit(1)


def _output_paths(output: str, n: int) -> list[Path]:
    """``-o x.png`` for one image; ``x-0.png``, ``x-1.png``, ... for several (the suffix stays last, and dots in
    folder names are left alone)."""
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _generate(args) -> int:
    suffix = Path(args.output).suffix.lower()
    if suffix and suffix not in OUTPUT_FORMATS:  # before the model loads: a typo should cost nothing
        print(f"fewstep: cannot write {args.output!r}: unsupported extension {suffix!r}; use one of "
              f"{', '.join(OUTPUT_FORMATS)}", file=sys.stderr)
        return 2
    fmt = OUTPUT_FORMATS.get(suffix, "png")

    from fewstep.engines.core import EngineCore, EngineError, GenerateRequest
    from fewstep.engines.loading import CheckpointError, load_checkpoint, read_index
    from fewstep.engines.pipeline import FewStepPipeline

    from .config import load_config

    cfg = load_config({"model": args.model, "engine.device": args.device, "engine.dtype": args.dtype})
    path = cfg.model_dir()
    device = cfg.engine.resolve_device()
    dtype = cfg.engine.resolve_dtype(device)
    try:
        if (read_index(path).get("fewstep") or {}).get("kind") == "video":
            print(f"fewstep: {path} is a video model; serve it (fewstep serve --model ...) and use the WebSocket "
                  "/v1/stream or POST /v1/videos", file=sys.stderr)
            return 2
        pipe = FewStepPipeline(load_checkpoint(path, device, dtype, vae=args.vae), device, dtype,
                               adapters=args.adapters)
    except CheckpointError as e:
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    w = h = None
    if args.size:
        h, w = args.size
    core = EngineCore({"model": pipe}, cfg.engine.model_copy(update={"prompt_cache_size": 0}))
    req = GenerateRequest(prompt=args.prompt, n=args.n, height=h, width=w, steps=args.steps,
                          guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                          nasa_scale=args.nasa_scale, nag_scale=args.nag_scale, nag_tau=args.nag_tau,
                          nag_alpha=args.nag_alpha, seed=args.seed, output_format=fmt)
    try:
        fut = core.add_request(req)
    except EngineError as e:  # bad size, n above the engine's batch limit, ...
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    core.step()
    out = fut.result()
    core.shutdown()
    if out.error:
        print(f"fewstep: generation failed: {out.error}", file=sys.stderr)
        return 1
    paths = _output_paths(args.output, len(out.images))
    for p, data in zip(paths, out.images):
        p.write_bytes(data)
    t = out.timings
    stages = " ".join(f"{k.removesuffix('_ms')}={v:.1f}ms" for k, v in t.items() if k.endswith("_ms"))
    wall_ms = 1e3 * (time.perf_counter() - t0)
    print(f"wrote {', '.join(map(str, paths))} (seed {out.seeds[0]}; {stages}; wall {wall_ms:.0f} ms)")
    return 0


def _bench_images(args) -> int:
    from fewstep.clients.bench import run_images_bench

    try:
        report = run_images_bench(args)
    except ValueError as e:
        args._parser.error(str(e))
    return 0 if report.get("completed", 0) > 0 else 1


def _bench_stream(args) -> int:
    from fewstep.clients.bench_stream import run_stream_bench

    try:
        report = run_stream_bench(args)
    except ValueError as e:
        args._parser.error(str(e))
    return 0 if report.get("frames_delivered", 0) > 0 else 1


def _build(args) -> int:
    from fewstep.engines.backends.tensorrt import Profile, TensorRTUnavailable, build
    from fewstep.engines.loading import CheckpointError

    from .config import load_config

    cfg = load_config({"model": args.model, "engine.tensorrt.cache_dir": args.cache_dir,
                       "engine.tensorrt.profile": args.profile})
    trt_cfg = cfg.engine.tensorrt
    try:
        profile = Profile.parse(trt_cfg.profile) if trt_cfg.profile else None
    except ValueError as e:
        args._parser.error(str(e))
    components = [c.strip() for c in args.components.split(",")] if args.components else None
    targets = [t.strip() for t in args.target.split(",")] if args.target else trt_cfg.targets or None

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        results = build(cfg.model_dir(), profile, args.precision, cfg.engine.batching.max_batch_size,
                        components=components, cache_dir=trt_cfg.cache_dir, targets=targets, progress=progress)
    except (CheckpointError, TensorRTUnavailable, ValueError) as e:
        print(f"fewstep: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"fewstep: engine build failed: {e}", file=sys.stderr)
        return 1
    for r in results:
        print(r.line())
    f = results[0].fields
    print(f"{len(results)} engine(s) for {f['flavour']} {f['flavour_version']}, target {f['target']}, "
          f"{sum(not r.hit for r in results)} built, {time.perf_counter() - t0:.1f} s")
    return 0


# `fewstep bench NAME ARGS` / `fewstep train study ARGS`: modules with their own argument parsers, run as if by
# `python -m MODULE ARGS` but with site-packages (not the working directory) at the front of sys.path.
BENCH_TOOLS = {
    "pipeline": ("fewstep.benchmarks.pipeline_bench",
                 "in-process latency of one checkpoint, per stage, against diffusers (eager and compiled)"),
    "encode": ("fewstep.benchmarks.image_encode_bench", "image encoding on the CPU (PIL) and GPU (nvjpeg)"),
    "quality": ("fewstep.benchmarks.quality", "prompt adherence of the embedded models as served"),
    "ramp": ("fewstep.benchmarks.stream_ramp", "a stream's warm-up ramps: work and time to the first frame, and "
             "the quality of the frames they give (in-process, a video checkpoint)"),
    "report": ("fewstep.benchmarks.report", "tables and plots regenerated from benchmarks/results"),
    "kernels": ("fewstep.benchmarks.kernels.bench_block_sparse_attention",
                "block-sparse attention kernel against cuDNN SDPA and FlexAttention"),
    "guidance": ("fewstep.benchmarks.kernels.bench_guidance",
                 "fused CFG step, adapter linear and NASA attention kernels against torch (unfused)"),
    "nasa-quality": ("fewstep.benchmarks.kernels.quality_nasa",
                     "whether NASA steers the embedded student away from a negative prompt (colour detector)"),
    "kernels-quality": ("fewstep.benchmarks.kernels.quality_block_sparse",
                        "adherence of the embedded models with block-sparse attention"),
    "random-weights": ("fewstep.benchmarks.random_weights",
                       "write a full-size architecture with random weights (speed and parity runs only)"),
    "reliability": ("fewstep.benchmarks.reliability", "real servers under hostile and heavy clients: report"),
    "ray": ("fewstep.benchmarks.ray_bench", "Ray Serve on this machine: autoscaling 1 -> 2 -> 1 under load, and CPU "
            "throughput of 1 and 2 replicas"),
    "plain-stream": ("fewstep.benchmarks.plain_stream_client",
                     "one stream read by a bare websockets client: cross-checks `fewstep bench stream`"),
}
TRAIN_TOOLS = {
    "study": ("fewstep.training.study", "CPU-side studies of the training recipe"),
    "bench": ("fewstep.training.bench", "training-step throughput on the GPU"),
}


def run_tool(module: str, prog: str, argv: list[str]) -> int:
    import runpy

    sys.argv = [prog, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def _tool_dispatch(argv: list[str]) -> int | None:
    """Runs a passthrough tool if argv names one, else returns None (argparse handles the rest)."""
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH_TOOLS:
        return run_tool(BENCH_TOOLS[argv[1]][0], f"fewstep bench {argv[1]}", argv[2:])
    if len(argv) >= 1 and argv[0] == "train":
        if len(argv) >= 2 and argv[1] in TRAIN_TOOLS:
            return run_tool(TRAIN_TOOLS[argv[1]][0], f"fewstep train {argv[1]}", argv[2:])
        from fewstep.training.__main__ import main as train_main

        return train_main(argv[1:])
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fewstep", description="Serve distilled one- and few-step generative models.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="serve the HTTP API")
    _common_model_args(s, serve=True)
    s.add_argument("--model-name", help="model id in the API (default: directory name)")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--max-batch-size", type=int, default=None,
                   help="most images in one forward pass (default 8)")
    s.add_argument("--max-queue-seconds", type=float, default=None, metavar="S",
                   help="refuse (503 + Retry-After) a request when the queued work ahead of it is estimated above S "
                        "seconds (default 5: favours throughput; 0: no queue, a request is admitted only while the "
                        "engine is idle, which with --max-batch-size 1 favours latency: see docs/serving.md)")
    s.add_argument("--max-wait-ms", type=float, default=None,
                   help="how long the first waiting request may wait for others to batch with (default 0: an idle "
                        "engine starts a request at once; requests arriving meanwhile form the next batch)")
    s.add_argument("--engine", dest="backend", choices=["eager", "compiled", "tensorrt", "auto"], default=None,
                   help="eager (default), compiled (torch.compile + CUDA graphs per shape bucket), tensorrt "
                        "(engines from `fewstep build`; GPU runtime unverified on our hardware), or auto")
    s.add_argument("--sizes", default=None, type=_size_list,
                   help="image/video sizes every served model accepts, e.g. 512x512,768x768 (default: what the "
                        "checkpoint declares in fewstep.sizes / size_range, else its native size); others get a 400")
    s.add_argument("--compile-buckets", default=None, type=_int_list,
                   help="compiled engine: batch buckets to capture, e.g. 1,4,16 (default 1,2,4,8,16)")
    s.add_argument("--compile-stream-buckets", default=None, type=_int_list,
                   help="compiled engine, video models: sessions per stream step to capture, e.g. 1,2,4 (default "
                        "1,2,4; steps with more sessions run eager)")
    s.add_argument("--compile-sizes", default=None, type=_size_list,
                   help="compiled engine: image or frame sizes to capture, e.g. 512x512,832x480 (default: native "
                        "size)")
    s.add_argument("--compile-mode", default=None,
                   help="compiled engine: Inductor mode (default 'default'; 'max-autotune-no-cudagraphs' tunes "
                        "kernels for minutes more)")
    s.add_argument("--compile-cudnn-benchmark", action="store_true", default=None,
                   help="compiled engine: cuDNN times its convolution algorithms per shape at warm-up instead of "
                        "its heuristics (default off)")
    s.add_argument("--compile-fp8", action="store_true", default=None,
                   help="compiled engine: the denoiser's linear layers in float8 (torchao, pip install "
                        "'fewstep[fp8]'; compute capability 8.9+, i.e. Ada or Hopper; default off)")
    s.add_argument("--compile-dynamic-batch", action="store_true", default=None,
                   help="compiled engine: one symbolic-batch compile for all buckets > 1 (faster start-up)")
    s.add_argument("--compile-channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled engine: NHWC convolutions in the UNet and VAE (default on: 8%% faster end to end "
                        "for SD-Turbo on an H200)")
    s.add_argument("--attention", default=None,
                   help='self-attention: "dense" (default, PyTorch SDPA), "xformers" (CUDA, needs the xformers '
                        'package for the installed torch) or, on DiTs, "block_sparse(threshold=0.9,block=128)"; '
                        '"block_sparse(mode=static,window=3x3x3,tile_3d=2x8x8)" for a fixed sliding-tile window (STA), '
                        'table=FILE inside the parentheses for a per-layer JSON table')
    s.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's choice)")
    s.add_argument("--engine-process", action="store_true", default=None,
                   help="run the engine in a process of its own (ZeroMQ between the two), so that HTTP parsing, JSON "
                        "and base64 never wait for the engine's Python thread; streams included (default off)")
    s.add_argument("--overlap-stages", choices=["auto", "on", "off"], default=None,
                   help="image batches: start batch N+1 on the GPU while batch N is copied, encoded and answered "
                        "(no device sync between stages; stage times from CUDA events); auto: on CUDA only "
                        "(default off)")
    s.add_argument("--overlap-decode", choices=["auto", "on", "off"], default=None,
                   help="video models: decode each step's chunks on a CUDA stream of their own while the next "
                        "step's forward pass runs; auto: on CUDA only (default off)")
    lim = s.add_argument_group("request limits (answered with 400 above them)")
    lim.add_argument("--max-n", type=int, default=None, help="images per request (default 16)")
    lim.add_argument("--max-side", type=int, default=None, help="largest width or height in pixels (default 2048)")
    lim.add_argument("--max-prompt-chars", type=int, default=None, help="longest prompt (default 2000)")
    st = s.add_argument_group("streams (video models)")
    st.add_argument("--max-sessions", type=int, default=None, help="open stream sessions (default 32)")
    st.add_argument("--max-batch-sessions", type=int, default=None,
                    help="session buffers per forward pass (default 8)")
    st.add_argument("--outbox-chunks", type=int, default=None,
                    help="undelivered chunks kept per viewer before the oldest is dropped (default 2)")
    st.add_argument("--stream-ramp", choices=["full", "trim", "jump"], default=None,
                    help="how a new stream's buffer fills before its first frame: full (K passes over the whole "
                         "buffer), trim (K passes over only the chunks that move) or jump (2 passes; the first "
                         "chunks get fewer, larger steps) (default: the checkpoint's fewstep.ramp, else full)")
    sec = s.add_argument_group("security and limits")
    sec.add_argument("--api-key", action="append", default=None, metavar="KEY",
                     help="accept this API key (repeatable; or FEWSTEP_API_KEYS=k1,k2): 'Authorization: Bearer KEY', "
                          "or ?token=KEY on WebSockets and <img> URLs from a browser. Pass one whenever --host is "
                          "not 127.0.0.1")
    sec.add_argument("--allow-origin", action="append", default=None, metavar="URL",
                     help="allow requests and WebSockets whose Origin is URL (repeatable; '*' for any); the "
                          "server's own origin is always allowed, any other gets 403")
    sec.add_argument("--cors-origin", action="append", default=None, metavar="URL",
                     help="send CORS headers to this origin (repeatable; '*' for any); default: CORS off")
    sec.add_argument("--protect-metrics", action="store_true", default=None,
                     help="/health, /ready and /metrics need a key too (default: open)")
    sec.add_argument("--max-streams-per-client", type=int, default=None,
                     help="open WebSocket/MJPEG streams per key, or per address without keys (default 8; 0: no limit)")
    sec.add_argument("--rate-limit", type=float, default=None, metavar="RPS",
                     help="requests a second per key or address, bursts of twice that (default 0: no limit)")
    sec.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                     help="close WebSockets unused by either side for S seconds (default 60)")
    sec.add_argument("--shutdown-grace", type=float, default=None, metavar="S",
                     help="after SIGTERM, seconds for in-flight work before it is cancelled (default 10)")
    ray = s.add_argument_group("scale-out on Ray Serve (pip install 'fewstep[ray]'; docs/serving.md)")
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="serve through Ray Serve with N replicas, one engine each (one GPU each on a GPU host); "
                          "with --max-replicas, the fewest the autoscaler keeps")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="N",
                     help="autoscale on ongoing requests between --replicas (default 1) and N replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, metavar="N",
                     help="with --max-replicas: ongoing requests per replica (open sockets included) that the "
                          "autoscaler aims at; above it, replicas are added (default 8)")
    ray.add_argument("--upscale-delay", type=float, default=None, metavar="S",
                     help="with --max-replicas: seconds load must stay above the target before a replica is added "
                          "(default 10)")
    ray.add_argument("--downscale-delay", type=float, default=None, metavar="S",
                     help="with --max-replicas: seconds load must stay below the target before a replica is removed "
                          "(default 120)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="join this Ray cluster (e.g. 10.0.0.5:6379, or 'auto' for the local one); default: start "
                          "a Ray cluster of this machine for the server's lifetime")
    s.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="generate images in-process, without a server")
    g.add_argument("prompt", help="what to draw, e.g. \"a red circle above a blue square\"")
    g.add_argument("-o", "--output", default="out.png", help="output file: .png, .jpg, .jpeg or .webp (no "
                   "extension: PNG); with -n > 1, x.png becomes x-0.png, x-1.png, ...")
    _common_model_args(g)
    g.add_argument("--steps", type=int, default=None, help="denoising steps, 1-8 (default: the model's own)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; image i uses seed+i (default: random, printed)")
    g.add_argument("--size", default=None, type=_one_size,
                   help="WxH, e.g. 512x512 (default: the model's native size)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance; above 1 doubles the work (default: the model's own)")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from: through CFG above guidance 1, else through NASA in the "
                        "cross-attention (models with guidance mode nasa)")
    g.add_argument("--nasa-scale", type=float, default=None,
                   help="NASA's alpha, how strongly the negative prompt is subtracted (default 0.5)")
    g.add_argument("--nag-scale", type=float, default=None,
                   help="NAG's phi: any --nag-* runs Normalized Attention Guidance's renormalised form of NASA "
                        "instead of plain subtraction (default 3; not with --nasa-scale)")
    g.add_argument("--nag-tau", type=float, default=None,
                   help="NAG's tau: per-token L1-norm ceiling of the steered features against the prompt's "
                        "(default 2.5)")
    g.add_argument("--nag-alpha", type=float, default=None,
                   help="NAG's alpha: the share of steered features blended into the prompt's own (default 0.5)")
    g.add_argument("-n", type=int, default=1, help="images to generate: -o x.png writes x-0.png, x-1.png, ...")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True, metavar="BENCHMARK")
    bi = bsub.add_parser("images", help="load-test an OpenAI-compatible images endpoint")
    from fewstep.clients.bench import add_images_args

    add_images_args(bi)
    bi.set_defaults(func=_bench_images, _parser=bi)
    bs = bsub.add_parser("stream", help="load-test the WebSocket /v1/stream endpoint (N sessions x M frames)")
    from fewstep.clients.bench_stream import add_stream_args

    add_stream_args(bs)
    bs.set_defaults(func=_bench_stream, _parser=bs)
    for name, (_, text) in BENCH_TOOLS.items():  # listed for --help; main() runs them with their own parsers
        bsub.add_parser(name, help=f"{text} (fewstep bench {name} --help)", add_help=False)

    e = sub.add_parser("build", help="build inference engines ahead of serving (TensorRT; cached on disk)")
    e.add_argument("--model", help="diffusers-format model directory, or an embedded model: default (image, the "
                   "default) or default-video")
    e.add_argument("--engine", choices=["tensorrt"], default="tensorrt", help="engine kind (tensorrt)")
    e.add_argument("--profile", default=None, help="optimization profile, e.g. batch=1:4:16,size=512:512:1024 "
                   "(MIN:OPT:MAX; size in pixels, or height=/width= apart); default: batch 1..max batch size at "
                   "the model's native size")
    e.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="engine precision (default fp16)")
    e.add_argument("--cache-dir", default=None, help="engine cache (default ~/.cache/fewstep/engines)")
    e.add_argument("--components", default=None, help="comma list of text_encoder,text_encoder_2,denoiser,vae "
                   "(default: all the model has)")
    e.add_argument("--target", default=None, help="TensorRT-RTX compute capabilities, e.g. sm86,sm89 (default: "
                   "the visible GPU, or RTX's default set on a CPU)")
    e.set_defaults(func=_build, _parser=e)

    sub.add_parser("train", add_help=False, help="train the embedded default models (fewstep train --help; stages: "
                   "teacher, distill, eval, all, video-teacher, video-distill, video-eval, study, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code = _tool_dispatch(argv)
    if code is not None:
        return code
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
