"""``fewstep bench images``: load generator and report for ``POST /v1/images/generations``.

Works against fewstep and against any OpenAI-Images-compatible endpoint: the
fewstep-only parts (the ``timings`` object in the response, and the extra request
fields ``seed``/``num_inference_steps``/``guidance_scale``/...) are optional on both
sides; request fields whose option is not given are left out of the body, except
``seed`` (one per request, derived from ``--seed``) and ``output_format``.

Load modes
----------
* closed loop (default): ``--concurrency C`` workers (default 1), each sending its
  next request as soon as the previous one finished;
* open loop: ``--request-rate R`` requests/s with Poisson arrivals (exponential
  gaps, seeded by ``--seed``; ``inf`` sends everything at once), optionally capped
  by ``--max-concurrency M`` in-flight requests (arrivals over the cap wait on the
  client; their latency is measured from the moment they are actually sent).

The run stops issuing requests after ``--num-requests N`` requests or after
``--duration S`` seconds, whichever comes first (default: 100 requests when neither
is given). Requests already in flight at the stop are awaited and counted; the
measured ``duration_s`` runs from the first dispatch to the last completion.
``--warmup K`` requests (default 2, sent one at a time) precede the measurement and
are not counted. Request ``i`` uses prompt ``i % len(prompts)`` and a seed derived
from (``--seed``, ``i``), so two runs with the same options send the same bodies.

Programmatic use::

    report = asyncio.run(bench_images(ImagesBenchConfig(url="http://127.0.0.1:8000",
                                                         num_requests=50, concurrency=4)))

JSON report schema (``--out FILE.json``; ``schema == "fewstep.bench.images/v1"``)
-------------------------------------------------------------------------------
All times in milliseconds unless the key ends in ``_s``. Any statistics block
``{"mean", "p50", "p90", "p99", ...}`` uses numpy's default (linear) percentiles
and is ``null`` when there are no samples.

::

    {
      "schema": "fewstep.bench.images/v1",
      "date_utc": str,                # ISO 8601, start of the measured run
      "fewstep_version": str | null,  # installed package version (client side)
      "git_commit": str | null,       # commit of the fewstep checkout running the bench
      "config": {                     # everything that shaped the load, never the API key
        "url": str, "endpoint": str,  # as given / the URL actually posted to
        "mode": "closed" | "poisson",
        "concurrency": int | null, "request_rate": float | null,
        "max_concurrency": int | null,
        "num_requests": int | null, "duration_s": float | null,
        "warmup": int, "seed": int, "timeout_s": float, "slo_ms": float | null,
        "size": str, "n": int, "steps": int | null, "guidance_scale": float | null,
        "negative_prompt": str | null, "output_format": str, "model": str | null,
        "size_source": str,           # "--size", "native size of <model>", ... (--size defaults to the model's)
        "served_model": str | null,   # the /v1/models card measured: --model's, else the default image model
        "model_default_steps": int | null,  # that card's default_steps (what steps=null ran)
        "prompt_file": str | null, "num_prompts": int, "prompts": [str, ...],  # first 20
        "api_key_set": bool
      },
      "server_models": [{"id": str, "kind": ...}, ...] | null,  # GET /v1/models before the run (best effort)
      "warmup": {"requests": int, "completed": int, "errors": {str: int}},
      "num_requests": int,            # requests sent in the measured run
      "completed": int,               # 2xx with a well-formed body
      "failed": int,
      "num_images": int,              # images received (sum of len(data))
      "duration_s": float,
      "request_throughput": float,    # completed / duration_s  (req/s)
      "image_throughput": float,      # num_images / duration_s (img/s)
      "latency_ms": {"mean", "std", "min", "p50", "p90", "p99", "max"} | null,
                                      # end to end, completed requests only
      "goodput": null | {             # only when --slo-ms is given
        "slo_ms": float,
        "good_requests": int,         # completed with latency <= slo_ms
        "request_throughput": float,  # good_requests / duration_s (req/s)
        "fraction": float             # good_requests / num_requests (errors count as bad)
      },
      "errors": {
        "total": int,
        "by_status": {"<http status>": int},          # e.g. {"400": 3, "503": 1}
        "by_exception": {"<exception class>": int},   # e.g. {"ConnectError": 2}, and
                                                      # "InvalidResponse" for a bad 2xx body
        "samples": [{"kind": str, "status": int | null, "message": str}]  # <= 10
      },
      "server_timings": null | {      # from the response's "timings" object (fewstep only)
        "<key>": {"mean", "p50", "p99", "count"}   # every numeric key, e.g. queue_ms,
      },                                           # denoise_ms, total_ms, batch_size
      "serving_overhead_ms": null | {"mean", "p50", "p99", "count"},
                                      # per request: e2e latency - timings.total_ms
      "waterfall_ms": null | {"requests": int, "stages": [{"stage", "mean", "p50"}]},
                                      # each part of a request's span in order (WATERFALL); the means add up
                                      # to the mean e2e latency (fewstep servers that report receive_ms)
      "requests": [                   # only with --save-requests
        {"index": int, "scheduled_s": float | null, "start_s": float, "latency_ms": float,
         "ok": bool, "status": int | null, "error": str | null, "images": int,
         "timings": dict | null}
      ]
    }
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, Sequence

import httpx

from .bench_util import Progress, git_commit, median, pick_card, progress_enabled, resolve_size, write_plot
from .python import IMAGES_PATH, build_images_body

__all__ = [
    "SCHEMA",
    "DEFAULT_PROMPTS",
    "ImagesBenchConfig",
    "RequestRecord",
    "add_images_args",
    "run_images_bench",
    "bench_images",
    "run_images",
    "describe_run",
    "build_report",
    "format_report",
    "percentiles",
    "poisson_arrivals",
    "resolve_endpoint",
    "waterfall",
]

SCHEMA = "fewstep.bench.images/v1"
DEFAULT_NUM_REQUESTS = 100
FALLBACK_SIZE = "512x512"  # --size when the server lists no size for the model (an OpenAI-compatible non-fewstep)
MAX_ERROR_SAMPLES = 10
MAX_PROMPTS_IN_REPORT = 20
DEFAULT_PROMPTS = (
    "a photo of a red fox standing in fresh snow, golden hour",
    "an isometric illustration of a tiny city on a floating island",
    "a bowl of ramen on a wooden table, studio lighting, 35mm",
    "a watercolor painting of a lighthouse in a storm",
    "portrait of an astronaut in a sunflower field, film grain",
    "a cozy reading nook with plants and warm lamps, interior design photo",
    "a macro shot of a dew-covered spider web at dawn",
    "a cyberpunk street market at night in the rain, neon signs",
)


# ------------------------------------------------------------------ pure helpers


def percentiles(values: Iterable[float], qs: Iterable[float]) -> list[float]:
    """Percentiles ``qs`` (0..100) of ``values``, like ``numpy.percentile`` (linear).

    Position ``h = (n - 1) * q / 100`` in the sorted values, linearly interpolated
    between its two neighbours. Raises ``ValueError`` on empty input, NaN, or a
    ``q`` outside [0, 100].
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentiles() of an empty sequence")
    if any(math.isnan(x) for x in xs):
        raise ValueError("percentiles() of a sequence containing NaN")
    n = len(xs)
    out = []
    for q in qs:
        q = float(q)
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} outside [0, 100]")
        h = (n - 1) * (q / 100.0)
        lo = math.floor(h)
        hi = min(lo + 1, n - 1)
        t = h - lo
        a, b = xs[lo], xs[hi]
        # same two-sided lerp as numpy, exact at both ends
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))
    return out


def poisson_arrivals(rate: float, seed: int | None = None) -> Iterator[float]:
    """Endless arrival times (seconds from start) of a Poisson process of ``rate``/s.

    Gaps are i.i.d. exponential with mean ``1/rate``, drawn from
    ``random.Random(seed)``, so a seed fixes the whole schedule. ``rate == inf``
    yields 0.0 forever (everything at once).
    """
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


def request_seed(base_seed: int, index: int, namespace: str = "req") -> int:
    """Deterministic per-request generation seed in [0, 2**31)."""
    digest = hashlib.sha256(f"{base_seed}:{namespace}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_endpoint(url: str) -> str:
    """Full images URL from a base URL: ``http://h:8000`` -> ``http://h:8000/v1/images/generations``.

    A URL already ending in ``/v1/images/generations`` is kept; one ending in
    ``/v1`` (an OpenAI-style base URL) gets ``/images/generations``.
    """
    u = url.strip().rstrip("/")
    if "://" not in u:
        u = "http://" + u
    if u.endswith(IMAGES_PATH):
        return u
    if u.endswith("/v1"):
        return u + IMAGES_PATH[len("/v1") :]
    return u + IMAGES_PATH


def _fewstep_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fewstep")
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------- config


@dataclass
class ImagesBenchConfig:
    """Everything one ``bench images`` run needs. Validated on construction (``ValueError``)."""

    url: str
    api_key: str | None = None
    # load
    concurrency: int | None = None  # closed loop (default 1 when no request_rate)
    request_rate: float | None = None  # open loop, Poisson, req/s (may be inf)
    max_concurrency: int | None = None  # open-loop in-flight cap
    num_requests: int | None = None
    duration: float | None = None  # seconds
    warmup: int = 2
    seed: int = 0
    timeout: float = 300.0  # per request, seconds
    slo_ms: float | None = None
    # request
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompt_file: str | None = None  # recorded only; load it with load_prompts()
    size: str | None = None  # None: the served model's native size (resolved from GET /v1/models by bench_images)
    n: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    output_format: str = "png"
    model: str | None = None
    raw_image: bool = False  # Accept: image/<output_format>: the image bytes as the body, timings in Server-Timing
    # output
    save_requests: bool = False  # include per-request records in the report
    # resolved by bench_images from GET /v1/models (recorded in the report)
    size_source: str = "--size"
    served_model: str | None = None
    model_default_steps: int | None = None

    def __post_init__(self) -> None:
        if self.request_rate is not None and self.concurrency is not None:
            raise ValueError(
                "--concurrency (closed loop) and --request-rate (open loop) are exclusive; "
                "use --max-concurrency to cap an open-loop run"
            )
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0")
        if self.max_concurrency is not None:
            if self.request_rate is None:
                raise ValueError("--max-concurrency applies to --request-rate runs only")
            if self.max_concurrency < 1:
                raise ValueError("--max-concurrency must be >= 1")
        if self.request_rate is None and self.concurrency is None:
            self.concurrency = 1
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.num_requests is None and self.duration is None:
            self.num_requests = DEFAULT_NUM_REQUESTS
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be > 0")
        if (
            self.request_rate is not None
            and math.isinf(self.request_rate)
            and self.num_requests is None
        ):
            raise ValueError("--request-rate inf needs --num-requests")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.n < 1:
            raise ValueError("--n must be >= 1")
        if self.raw_image and self.n != 1:
            raise ValueError("--raw-image answers hold one image: use it with --n 1")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("--timeout must be > 0")
        if self.slo_ms is not None and not self.slo_ms > 0:
            raise ValueError("--slo-ms must be > 0")
        self.prompts = [p for p in self.prompts if p]
        if not self.prompts:
            raise ValueError("no prompts")
        if self.size is not None and (not isinstance(self.size, str) or len(self.size.lower().split("x")) != 2):
            raise ValueError(f"--size must look like WxH, got {self.size!r}")

    @property
    def mode(self) -> str:
        return "poisson" if self.request_rate is not None else "closed"

    @property
    def endpoint(self) -> str:
        return resolve_endpoint(self.url)

    @property
    def max_in_flight(self) -> int | None:
        """Most requests this run can have in flight (None: unbounded)."""
        if self.mode == "closed":
            return self.concurrency
        if self.max_concurrency is not None:
            return self.max_concurrency
        if self.num_requests is not None:
            return self.num_requests
        return None

    def body(self, index: int, *, warmup: bool = False) -> dict[str, Any]:
        """Request body for request ``index`` (its prompt and derived seed)."""
        return build_images_body(
            self.prompts[index % len(self.prompts)],
            n=self.n,
            size=self.size or FALLBACK_SIZE,
            seed=request_seed(self.seed, index, "warmup" if warmup else "req"),
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            output_format=self.output_format,
            model=self.model,
        )

    def to_report_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d.pop("save_requests")
        prompts = d.pop("prompts")
        d["duration_s"] = d.pop("duration")
        d["timeout_s"] = d.pop("timeout")
        rate = d["request_rate"]
        if rate is not None and math.isinf(rate):
            d["request_rate"] = "inf"  # keep the JSON strict (no Infinity literal)
        d.update(
            endpoint=self.endpoint,
            mode=self.mode,
            num_prompts=len(prompts),
            prompts=prompts[:MAX_PROMPTS_IN_REPORT],
            api_key_set=bool(self.api_key),
        )
        order = [
            "url", "endpoint", "mode", "concurrency", "request_rate", "max_concurrency",
            "num_requests", "duration_s", "warmup", "seed", "timeout_s", "slo_ms", "size",
            "n", "steps", "guidance_scale", "negative_prompt", "output_format", "model",
            "prompt_file", "num_prompts", "prompts", "api_key_set", "size_source", "served_model",
            "model_default_steps",
        ]
        return {k: d[k] for k in order}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImagesBenchConfig":
        prompts = list(getattr(args, "prompt", None) or [])
        prompt_file = getattr(args, "prompt_file", None)
        if prompt_file:
            prompts += load_prompts(prompt_file)
        return cls(
            url=args.url,
            api_key=args.api_key,
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            num_requests=args.num_requests,
            duration=args.duration,
            warmup=args.warmup,
            seed=args.seed,
            timeout=args.timeout,
            slo_ms=args.slo_ms,
            prompts=prompts or list(DEFAULT_PROMPTS),
            prompt_file=str(prompt_file) if prompt_file else None,
            size=args.size,
            n=args.n,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            output_format=args.output_format,
            model=args.model,
            raw_image=args.raw_image,
            save_requests=args.save_requests,
        )


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped); for ``*.jsonl`` files,
    one JSON object per line with a ``"prompt"`` key."""
    p = Path(path)
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if p.suffix == ".jsonl":
        return [str(json.loads(ln)["prompt"]) for ln in lines]
    return lines


# ------------------------------------------------------------------------- run


@dataclass
class RequestRecord:
    """Outcome of one request. ``start_s``/``scheduled_s`` are seconds from run start."""

    index: int
    start_s: float
    latency_ms: float
    ok: bool
    status: int | None = None
    error: str | None = None  # error kind: HTTP status as str, or exception class name
    message: str | None = None
    images: int = 0
    timings: dict[str, Any] | None = None
    scheduled_s: float | None = None


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if "detail" in body:
            return str(body["detail"])[:300]
    return str(body)[:300]


async def _send_one(
    client: httpx.AsyncClient,
    cfg: ImagesBenchConfig,
    headers: dict[str, str],
    index: int,
    t0: float,
    *,
    warmup: bool = False,
    scheduled_s: float | None = None,
) -> RequestRecord:
    body = cfg.body(index, warmup=warmup)
    start = time.perf_counter()
    try:
        resp = await client.post(cfg.endpoint, json=body, headers=headers)
    # Last-resort boundary of one request: a load test records any failure (transport errors, and anything
    # unexpected) in that request's row instead of aborting the run. CancelledError is a BaseException: not caught.
    except Exception as exc:  # noqa: BLE001
        latency = (time.perf_counter() - start) * 1e3
        return RequestRecord(
            index, start - t0, latency, False, None, type(exc).__name__,
            str(exc)[:300] or type(exc).__name__, scheduled_s=scheduled_s,
        )
    latency = (time.perf_counter() - start) * 1e3
    rec = RequestRecord(index, start - t0, latency, False, resp.status_code, scheduled_s=scheduled_s)
    if resp.status_code >= 400 or resp.status_code < 200:
        rec.error = str(resp.status_code)
        rec.message = _error_message(resp)
        return rec
    if cfg.raw_image:
        if not resp.headers.get("content-type", "").startswith("image/") or not resp.content:
            rec.error = "InvalidResponse"
            rec.message = f"asked for an image, got {resp.headers.get('content-type')!r}"
            return rec
        rec.ok, rec.images = True, 1
        rec.timings = parse_server_timing(resp.headers.get("server-timing", ""))
        return rec
    try:
        payload = resp.json()
        data = payload["data"]
        if not isinstance(data, list) or not data:
            raise ValueError("empty 'data'")
    except (ValueError, KeyError, TypeError) as exc:  # not JSON (a ValueError), no "data", or not an object
        rec.error = "InvalidResponse"
        rec.message = f"{type(exc).__name__}: {exc}"[:300]
        return rec
    rec.ok = True
    rec.images = len(data)
    timings = payload.get("timings")
    if isinstance(timings, dict):
        rec.timings = timings
    return rec


def parse_server_timing(header: str) -> dict[str, float]:
    """``queue;dur=0.1, decode;dur=7.9`` (W3C Server-Timing) -> ``{"queue_ms": 0.1, "decode_ms": 7.9}``, the keys of
    a JSON answer's ``timings``; entries without a duration are skipped."""
    out = {}
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        for p in params:
            if p.startswith("dur="):
                try:
                    out[f"{name}_ms"] = float(p[4:])
                except ValueError:
                    pass
    return out


async def _closed_loop(
    cfg: ImagesBenchConfig, send: Callable[[int, float | None], Awaitable[RequestRecord]]
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    next_index = 0
    t_start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        while True:
            if cfg.num_requests is not None and next_index >= cfg.num_requests:
                return
            if cfg.duration is not None and time.perf_counter() - t_start >= cfg.duration:
                return
            i = next_index
            next_index += 1
            records.append(await send(i, None))

    assert cfg.concurrency is not None
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return records


async def _open_loop(
    cfg: ImagesBenchConfig, send: Callable[[int, float | None], Awaitable[RequestRecord]]
) -> list[RequestRecord]:
    assert cfg.request_rate is not None
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: list[asyncio.Task[RequestRecord]] = []
    t_start = time.perf_counter()

    async def one(i: int, t: float) -> RequestRecord:
        if sem is None:
            return await send(i, t)
        async with sem:
            return await send(i, t)

    for i, t in enumerate(poisson_arrivals(cfg.request_rate, cfg.seed)):
        if cfg.num_requests is not None and i >= cfg.num_requests:
            break
        if cfg.duration is not None and t >= cfg.duration:
            break
        delay = t_start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t)))
    return list(await asyncio.gather(*tasks))


async def bench_images(cfg: ImagesBenchConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` and return the report (see module doc). ``progress``: draw a live
    bar on stderr. ``cfg.size`` None becomes the served model's native size; a size the model does not serve
    raises ValueError before any request is sent."""
    report, _ = await run_images(cfg, progress=progress)
    return report


def resolve_model(cfg: ImagesBenchConfig, served: list[dict] | None) -> None:
    """Fill ``cfg.size`` (when None), ``size_source``, ``served_model`` and ``model_default_steps`` from the
    server's model cards (``--model``'s, else the default image model's). ValueError for a model a fewstep server
    does not list or a size it does not serve."""
    card = pick_card(served, cfg.model, "image")
    fewstep = any(isinstance(m, dict) and "default_size" in m for m in served or ())
    if card is None and cfg.model is not None and fewstep:
        raise ValueError(f"model {cfg.model!r} is not served at {cfg.url}; served: "
                         f"{', '.join(str(m.get('id')) for m in served or ())}")
    if card is not None and card.get("kind") == "video":
        raise ValueError(f"model {card.get('id')!r} is a video model: use `fewstep bench stream`")
    cfg.size, cfg.size_source = resolve_size(card, cfg.size, fallback=FALLBACK_SIZE)
    cfg.served_model = (card or {}).get("id")
    steps = (card or {}).get("default_steps")
    cfg.model_default_steps = steps if isinstance(steps, int) else None


class _LiveImages:
    """Progress of the measured requests: the bar's postfix is failures and p50 so far (tqdm shows the rate)."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.lat: list[float] = []
        self.failed = 0

    def done(self, rec: RequestRecord) -> None:
        if rec.ok:
            self.lat.append(rec.latency_ms)
        else:
            self.failed += 1
        if self.bar.enabled:
            p50 = median(self.lat)
            text = f"p50 {p50:.0f} ms" if p50 is not None else "p50 -"
            self.bar.update(1, f"{text}, {self.failed} failed")


async def run_images(cfg: ImagesBenchConfig, *, progress: bool = False) -> tuple[dict[str, Any], list[RequestRecord]]:
    """:func:`bench_images`, also returning the measured requests' records (the plot draws them)."""
    cap = cfg.max_in_flight
    # room for every request that can be in flight, so no request waits on the pool
    limits = httpx.Limits(
        max_connections=None if cap is None else cap + 4,
        max_keepalive_connections=None if cap is None else cap + 4,
    )
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    if cfg.raw_image:
        headers["Accept"] = f"image/{cfg.output_format}"
    # trust_env=False: no proxy from the environment sits between bench and server
    async with httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(cfg.timeout), trust_env=False
    ) as client:
        # what is served decides the size (and is recorded), before anything is sent
        served = await server_models(client, cfg.endpoint, headers)
        resolve_model(cfg, served)
        print(f"bench images: {describe_run(cfg.to_report_dict())}", file=sys.stderr, flush=True)

        # warm-up: sequential, not counted
        warm: list[RequestRecord] = []
        t_w = time.perf_counter()
        with Progress(progress and cfg.warmup > 0, cfg.warmup, "warm-up", "req") as bar:
            for i in range(cfg.warmup):
                warm.append(await _send_one(client, cfg, headers, i, t_w, warmup=True))
                bar.update(1, f"last {warm[-1].latency_ms:.0f} ms" + ("" if warm[-1].ok else " (failed)"),
                           force=True)

        date_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        with Progress(progress, cfg.num_requests, "requests", "req") as bar:
            live = _LiveImages(bar)

            async def send(i: int, scheduled_s: float | None) -> RequestRecord:
                rec = await _send_one(client, cfg, headers, i, t0, scheduled_s=scheduled_s)
                live.done(rec)
                return rec

            if cfg.mode == "closed":
                records = await _closed_loop(cfg, send)
            else:
                records = await _open_loop(cfg, send)
            duration = time.perf_counter() - t0
            p50 = median(live.lat)
            bar.set_postfix(("p50 -" if p50 is None else f"p50 {p50:.0f} ms") + f", {live.failed} failed")

    records.sort(key=lambda r: r.index)
    warm_errors: dict[str, int] = {}
    for r in warm:
        if not r.ok:
            warm_errors[r.error or "unknown"] = warm_errors.get(r.error or "unknown", 0) + 1
    report = build_report(
        records,
        duration_s=duration,
        config=cfg.to_report_dict(),
        slo_ms=cfg.slo_ms,
        warmup={
            "requests": len(warm),
            "completed": sum(r.ok for r in warm),
            "errors": warm_errors,
        },
        date_utc=date_utc,
        save_requests=cfg.save_requests,
    )
    report["server_models"] = served
    return report, records


async def server_models(client: httpx.AsyncClient, endpoint: str, headers: dict[str, str]) -> list[dict] | None:
    """What the server says it serves (``GET /v1/models``: id, kind, sizes), recorded in the report so that a
    result names its model even when the client ran on another machine. Best effort: None when unavailable."""
    base = endpoint[: -len(IMAGES_PATH)] if endpoint.endswith(IMAGES_PATH) else endpoint.rstrip("/")
    try:
        resp = await client.get(base + "/v1/models", headers=headers, timeout=10)
        data = resp.json().get("data") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None


# ---------------------------------------------------------------------- report


def _stats(values: Sequence[float], qs: Sequence[float] = (50, 90, 99), *, full: bool = True):
    if not values:
        return None
    ps = percentiles(values, qs)
    out: dict[str, Any] = {"mean": statistics.fmean(values)}
    if full:
        out["std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out["min"] = min(values)
    for q, p in zip(qs, ps):
        out[f"p{q:g}"] = p
    if full:
        out["max"] = max(values)
    return out


# A request's span, in order: what each part of its end-to-end latency was spent on (fewstep servers only).
WATERFALL = (
    ("client + HTTP", None),  # e2e minus everything the server timed: network, HTTP parsing on both sides
    ("receive", "receive_ms"),  # the server saw it -> the engine queued it (body, validation, hand-over)
    ("queue", "queue_ms"),
    ("encode_prompt", "encode_prompt_ms"),
    ("denoise", "denoise_ms"),
    ("decode", "decode_ms"),
    ("encode_image", "encode_image_ms"),
    ("engine other", None),  # total_ms minus the engine's named stages: scheduling, thread hops
    ("handoff", "handoff_ms"),  # the engine done -> the route resumed
    ("serialize", "serialize_ms"),  # base64 for JSON answers
)


def waterfall(ok: Sequence["RequestRecord"]) -> dict[str, Any] | None:
    """Mean and p50 of each part of the requests' spans (``WATERFALL``), from the server's ``timings``; the means
    add up to the mean end-to-end latency. None unless the server reported its span (receive_ms and total_ms)."""
    rows: dict[str, list[float]] = {name: [] for name, _ in WATERFALL}
    for r in ok:
        t = r.timings or {}
        if not all(_is_number(t.get(k)) for k in ("receive_ms", "total_ms")):
            continue
        part = {name: float(t.get(key) or 0.0) for name, key in WATERFALL if key}
        named_engine = sum(part[n] for n in ("queue", "encode_prompt", "denoise", "decode", "encode_image"))
        part["engine other"] = max(0.0, float(t["total_ms"]) - named_engine)
        span = part["receive"] + float(t["total_ms"]) + part["handoff"] + part["serialize"]
        part["client + HTTP"] = r.latency_ms - span
        for name in rows:
            rows[name].append(part[name])
    n = len(rows["queue"])
    if not n:
        return None
    return {"requests": n, "stages": [{"stage": name, "mean": statistics.fmean(v), "p50": percentiles(v, (50,))[0]}
                                      for name, v in rows.items()]}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_report(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    config: dict[str, Any] | None = None,
    slo_ms: float | None = None,
    warmup: dict[str, Any] | None = None,
    date_utc: str | None = None,
    save_requests: bool = False,
) -> dict[str, Any]:
    """Turn per-request records into the report dict (pure, apart from git/version lookup)."""
    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    lat = [r.latency_ms for r in ok]
    num_images = sum(r.images for r in ok)
    dur = max(float(duration_s), 1e-9)

    by_status: dict[str, int] = {}
    by_exception: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    for r in bad:
        kind = r.error or "unknown"
        if r.status is not None and kind == str(r.status):
            by_status[kind] = by_status.get(kind, 0) + 1
        else:
            by_exception[kind] = by_exception.get(kind, 0) + 1
        if len(samples) < MAX_ERROR_SAMPLES:
            samples.append({"kind": kind, "status": r.status, "message": r.message or ""})

    goodput = None
    if slo_ms is not None:
        good = sum(1 for x in lat if x <= slo_ms)
        goodput = {
            "slo_ms": float(slo_ms),
            "good_requests": good,
            "request_throughput": good / dur,
            "fraction": good / len(records) if records else 0.0,
        }

    # server-side per-stage timings (fewstep only)
    series: dict[str, list[float]] = {}
    overhead: list[float] = []
    for r in ok:
        if not r.timings:
            continue
        for k, v in r.timings.items():
            if _is_number(v):
                series.setdefault(k, []).append(float(v))
        total = r.timings.get("total_ms")
        if _is_number(total):
            overhead.append(r.latency_ms - float(total))
    server_timings = None
    if series:
        server_timings = {}
        for k, vals in series.items():
            s = _stats(vals, (50, 99), full=False)
            assert s is not None
            s["count"] = len(vals)
            server_timings[k] = s
    serving_overhead = None
    if overhead:
        serving_overhead = _stats(overhead, (50, 99), full=False)
        assert serving_overhead is not None
        serving_overhead["count"] = len(overhead)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date_utc": date_utc or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fewstep_version": _fewstep_version(),
        "git_commit": git_commit(short=False, where=Path(__file__).resolve().parent),
        "config": config or {},
        "warmup": warmup or {"requests": 0, "completed": 0, "errors": {}},
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(bad),
        "num_images": num_images,
        "duration_s": float(duration_s),
        "request_throughput": len(ok) / dur,
        "image_throughput": num_images / dur,
        "latency_ms": _stats(lat),
        "goodput": goodput,
        "errors": {
            "total": len(bad),
            "by_status": dict(sorted(by_status.items())),
            "by_exception": dict(sorted(by_exception.items())),
            "samples": samples,
        },
        "server_timings": server_timings,
        "serving_overhead_ms": serving_overhead,
        "waterfall_ms": waterfall(ok),
    }
    if save_requests:
        report["requests"] = [
            {
                "index": r.index,
                "scheduled_s": r.scheduled_s,
                "start_s": r.start_s,
                "latency_ms": r.latency_ms,
                "ok": r.ok,
                "status": r.status,
                "error": r.error,
                "images": r.images,
                "timings": r.timings,
            }
            for r in records
        ]
    return report


def _steps_text(cfg: dict[str, Any]) -> str:
    steps, default = cfg.get("steps"), cfg.get("model_default_steps")
    if steps is not None:
        return str(steps)
    return f"{default} (model default)" if default is not None else "server default"


def _model_text(cfg: dict[str, Any]) -> str:
    model = cfg.get("served_model") or cfg.get("model")
    if model is None:
        return "server default (not listed)"
    return model if cfg.get("model") else f"{model} (server default)"


def _load_text(cfg: dict[str, Any]) -> str:
    if cfg.get("mode") == "poisson":
        load = f"poisson {cfg.get('request_rate')} req/s"
        if cfg.get("max_concurrency"):
            load += f", max {cfg['max_concurrency']} in flight"
        return load
    return f"closed loop, concurrency {cfg.get('concurrency')}"


def _requests_text(cfg: dict[str, Any]) -> str:
    parts = []
    if cfg.get("num_requests") is not None:
        parts.append(f"{cfg['num_requests']}")
    if cfg.get("duration_s") is not None:
        parts.append(f"{cfg['duration_s']:g} s")
    return " or ".join(parts)


def describe_run(cfg: dict[str, Any]) -> str:
    """One line: what a run sends (printed on stderr before it starts)."""
    return (f"model {_model_text(cfg)}, size {cfg.get('size')} ({cfg.get('size_source')}), steps {_steps_text(cfg)}, "
            f"n={cfg.get('n')}, {cfg.get('output_format')}, {_load_text(cfg)}, {_requests_text(cfg)} requests "
            f"after {cfg.get('warmup')} warm-up")


def format_report(report: dict[str, Any]) -> str:
    """Human-readable table of a report (what ``run_images_bench`` prints)."""
    width = 56
    cfg = report.get("config", {})
    lines: list[str] = []

    def title(t: str) -> None:
        lines.append(f"{' ' + t + ' ':=^{width}}")

    def sub(t: str) -> None:
        lines.append(f"{' ' + t + ' ':-^{width}}")

    def row(label: str, value: Any, fmt: str = "") -> None:
        if value is None:
            text = "-"
        elif fmt:
            text = format(value, fmt)
        else:
            text = str(value)
        lines.append(f"{label + ':':<38}{text:>{width - 38}}")

    title("fewstep bench images")
    row("Endpoint", cfg.get("endpoint"))
    row("Model", _model_text(cfg))
    size = cfg.get("size")
    source = cfg.get("size_source")
    row("Size", f"{size} (native)" if source and source.startswith("native") else size)
    row("Steps", _steps_text(cfg))
    row("Images per request / format", f"{cfg.get('n')} / {cfg.get('output_format')}")
    row("Load", _load_text(cfg))
    row("Requests (limit)", _requests_text(cfg))
    warm = report.get("warmup") or {}
    row("Warm-up requests (ok)", f"{cfg.get('warmup')} ({warm.get('completed', 0)} ok)")
    row("Successful requests", report["completed"])
    row("Failed requests", report["failed"])
    row("Images", report["num_images"])
    row("Benchmark duration (s)", report["duration_s"], ".2f")
    row("Request throughput (req/s)", report["request_throughput"], ".2f")
    row("Image throughput (img/s)", report["image_throughput"], ".2f")
    gp = report.get("goodput")
    if gp:
        row(f"Goodput @ {gp['slo_ms']:g} ms (req/s)", gp["request_throughput"], ".2f")
        row("Within SLO (fraction)", gp["fraction"], ".3f")
    lat = report.get("latency_ms")
    sub("End-to-end latency (ms)")
    if lat:
        for k, label in (("mean", "Mean"), ("p50", "P50"), ("p90", "P90"), ("p99", "P99"), ("max", "Max")):
            row(f"{label} E2E latency (ms)", lat[k], ".2f")
    else:
        row("E2E latency", "no successful request")
    st = report.get("server_timings")
    if st:
        sub("Server timings (mean / p50 / p99)")
        for k, s in st.items():
            row(k, f"{s['mean']:.2f} / {s['p50']:.2f} / {s['p99']:.2f}")
        oh = report.get("serving_overhead_ms")
        if oh:
            row("Serving overhead P50 (ms)", oh["p50"], ".2f")
    wf = report.get("waterfall_ms")
    if wf:
        sub(f"Where a request's time goes (mean / p50 ms, {wf['requests']} requests)")
        for st in wf["stages"]:
            row(st["stage"], f"{st['mean']:.2f} / {st['p50']:.2f}")
    errs = report.get("errors", {})
    if errs.get("total"):
        sub("Errors")
        for k, v in errs.get("by_status", {}).items():
            row(f"HTTP {k}", v)
        for k, v in errs.get("by_exception", {}).items():
            row(k, v)
        for s in errs.get("samples", [])[:3]:
            lines.append(f"  [{s['kind']}] {s['message'][:width - 8]}")
    lines.append("=" * width)
    return "\n".join(lines)


# ------------------------------------------------------------------------- CLI


def _rate(text: str) -> float:
    v = float(text)  # accepts "inf"
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0 (or 'inf')")
    return v


def add_images_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench images`` arguments (positional ``url`` included) to ``parser``."""
    parser.add_argument(
        "url",
        help="server base URL, e.g. http://127.0.0.1:8000 (/v1/images/generations is "
        "appended unless the URL already ends with it)",
    )
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")

    load = parser.add_argument_group("load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency", type=int, default=None,
        help="closed loop with this many requests in flight (default: 1)",
    )
    mode.add_argument(
        "--request-rate", type=_rate, default=None,
        help="open loop: Poisson arrivals at this many requests/s ('inf': all at once)",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None,
        help="with --request-rate: cap on requests in flight",
    )
    load.add_argument(
        "--num-requests", type=int, default=None,
        help=f"stop after this many requests (default {DEFAULT_NUM_REQUESTS} "
        "when --duration is not given)",
    )
    load.add_argument(
        "--duration", type=float, default=None,
        help="stop issuing requests after this many seconds (first of the two limits wins)",
    )
    load.add_argument("--warmup", type=int, default=2, help="uncounted warm-up requests (default 2)")
    load.add_argument("--seed", type=int, default=0, help="seeds arrivals and request seeds (default 0)")
    load.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s (default 300)")
    load.add_argument("--slo-ms", type=float, default=None, help="latency SLO for goodput, ms")

    req = parser.add_argument_group("request")
    req.add_argument(
        "--prompt", action="append", default=None,
        help="prompt (repeatable; requests cycle through them)",
    )
    req.add_argument(
        "--prompt-file", default=None,
        help="file with one prompt per line (or .jsonl with a 'prompt' key)",
    )
    req.add_argument("--size", default=None,
                     help="WxH (default: the model's native size, from GET /v1/models; a size the model does not "
                     f"serve is refused before the run; {FALLBACK_SIZE} where the server lists none)")
    req.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    req.add_argument("--steps", type=int, default=None, help="num_inference_steps (server default if unset)")
    req.add_argument("--guidance-scale", type=float, default=None,
                     help="sent as guidance_scale (default: the model's own)")
    req.add_argument("--negative-prompt", default=None, help="sent as negative_prompt (used with guidance > 1)")
    req.add_argument("--output-format", default="png", choices=["png", "jpeg", "webp"],
                     help="image encoding the server returns (default png)")
    req.add_argument("--model", default=None, help="model id (server default if unset)")
    req.add_argument("--raw-image", action="store_true",
                     help="send Accept: image/<output-format>: the answer is the image itself (no JSON, no base64) "
                          "and the server's timings come in its Server-Timing header (n=1 only)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="write the full JSON report to this file, and its plot next to it (bench.json -> "
                     "bench.png: latency distribution, throughput over time; needs matplotlib)")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="live progress bar on stderr (default: on when stderr is a terminal)")
    out.add_argument(
        "--save-requests", action="store_true",
        help="include every request's record in the JSON report",
    )


def run_images_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run from parsed ``add_images_args`` arguments: print the table, write ``--out``,
    return the report. Raises ``ValueError`` on inconsistent options."""
    cfg = ImagesBenchConfig.from_args(args)
    report, records = asyncio.run(run_images(cfg, progress=progress_enabled(getattr(args, "progress", None))))
    print(format_report(report), flush=True)
    out = getattr(args, "out", None)
    if out:
        path = Path(out)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"report written to {path}", file=sys.stderr)
        png = write_plot("images", report, records, path)
        if png is not None:
            print(f"plot written to {png}", file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m fewstep.clients.bench URL ...``) until the CLI wires it."""
    parser = argparse.ArgumentParser(prog="fewstep bench images", description="Benchmark an OpenAI-compatible /v1/images/generations endpoint.")
    add_images_args(parser)
    args = parser.parse_args(argv)
    try:
        report = run_images_bench(args)
    except ValueError as e:
        parser.error(str(e))
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
