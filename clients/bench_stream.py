"""``fewstep bench stream``: N concurrent stream sessions of M frames against WS /v1/stream.

Every session is a real client (:class:`fewstep.clients.python.AsyncFewstepClient`): it opens the socket, sends
``start`` (sessions start together, or ``--stagger-ms`` apart), reads frames until it has received M of them, then
sends ``stop``. All times are measured on the client, from frames actually delivered to it:

* time to first frame: from just before the socket opens to the first frame's arrival (connect + start + buffer
  warm-up + decode + encode + transfer);
* delivered fps per session: ``(frames - 1) / (last arrival - first arrival)``; aggregate fps: all frames over the
  span from the earliest first frame of any session to the latest last frame of any;
* inter-frame time: gaps between consecutive frame arrivals of a session (frames come in chunks of
  ``chunk_frames``, so the distribution is bimodal: ~0 within a chunk; ``chunk_interval_ms`` is the gap between
  chunks);
* dropped frames: gaps in frame indices seen by the client (frames the server dropped because this client fell
  behind), and the server's own count from the last ``stats`` message.

JSON report (``--out FILE``; ``schema == "fewstep.bench.stream/v1"``)::

    {"schema", "date_utc", "fewstep_version", "git_commit",
     "config": {"url", "sessions", "frames", "size", "fps", "format", "prompt", "seed", "stagger_ms", "timeout_s",
                "model", "size_source", "fps_requested"},
                # model, size ("WxH") and fps: what the server's "started" message said it ran (else what was
                # resolved from GET /v1/models); fps_requested: --fps (None: the model's)
     "sessions_completed", "sessions_failed", "errors": [str, ...],
     "frames_delivered", "frames_dropped", "server_frames_dropped", "duration_s",
     "ttff_ms": {"mean", "p50", "p90", "p99", "min", "max"},
     "fps_per_session": {...same keys...}, "aggregate_fps": float,
     "inter_frame_ms": {...}, "chunk_interval_ms": {...},
     "per_session": [{"session_id", "seed", "frames", "ttff_ms", "fps", "dropped", "server_dropped",
                      "chunk_frames", "error"}],
     "server_models": [{"id", "kind", "chunk_frames", "fps", ...}] | None}   # GET /v1/models, best effort
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import httpx

from .bench import _fewstep_version, percentiles
from .bench_util import Progress, git_commit, pick_card, progress_enabled, resolve_size, write_plot
from .python import AsyncFewstepClient, FewstepError

SCHEMA = "fewstep.bench.stream/v1"


@dataclass
class SessionRecord:
    index: int
    seed: int
    session_id: str = ""
    chunk_frames: int = 1
    first_chunk_frames: int = 1
    t_open: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    server_dropped: int | None = None
    error: str | None = None
    started: dict[str, Any] = field(default_factory=dict)  # the server's "started" message

    @property
    def ttff_ms(self) -> float | None:
        return (self.arrivals[0] - self.t_open) * 1e3 if self.arrivals else None

    @property
    def fps(self) -> float | None:
        if len(self.arrivals) < 2:
            return None
        return (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-9)

    @property
    def dropped(self) -> int:
        return sum(max(0, b - a - 1) for a, b in zip(self.indices, self.indices[1:]))


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = percentiles(values, (50, 90, 99))
    return {"mean": statistics.fmean(values), "p50": p50, "p90": p90, "p99": p99, "min": min(values),
            "max": max(values)}


class _Live:
    """Progress of all sessions: frames delivered (the bar), aggregate fps since the first frame, sessions."""

    def __init__(self, bar: Progress, sessions: int):
        self.bar = bar
        self.sessions = sessions
        self.open = self.done = self.failed = 0
        self.frames = 0
        self.t_first: float | None = None

    def postfix(self) -> str:
        span = time.perf_counter() - self.t_first if self.t_first is not None else 0.0
        fps = f"{(self.frames - 1) / span:.1f} fps" if span > 0 and self.frames > 1 else "- fps"
        text = f"{fps}, sessions {self.open} open / {self.done} done / {self.sessions}"
        return text + (f", {self.failed} failed" if self.failed else "")

    def frame(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.frames += 1
        if self.bar.enabled:
            self.bar.update(1, self.postfix())

    def session(self, opened: int = 0, done: int = 0, failed: int = 0) -> None:
        self.open += opened
        self.done += done
        self.failed += failed
        if self.bar.enabled:
            self.bar.update(0, self.postfix(), force=True)


async def _one_session(client: AsyncFewstepClient, rec: SessionRecord, args, live: _Live | None = None) -> None:
    rec.t_open = time.perf_counter()
    try:
        stream = await client.stream(args.prompt, size=args.size, seed=rec.seed, fps=args.fps, format=args.format,
                                     model=getattr(args, "model", None))
    except FewstepError as e:
        rec.error = f"{type(e).__name__}: {e.message}"
        if live:
            live.session(failed=1)
        return
    if live:
        live.session(opened=1)
    rec.started = dict(stream.info)
    rec.session_id = stream.session_id
    rec.chunk_frames = int(stream.info.get("chunk_frames", 1))
    rec.first_chunk_frames = int(stream.info.get("first_chunk_frames") or rec.chunk_frames)
    try:
        async with stream:
            async for frame in stream:  # ends at the server's "stopped"
                if len(rec.arrivals) < args.frames:
                    rec.arrivals.append(frame.received_at)
                    rec.indices.append(frame.index)
                    if live:
                        live.frame()
                    if len(rec.arrivals) == args.frames:
                        await stream.stop()  # frames already in flight after this are not counted
            final = stream.stopped or stream.stats or {}
            rec.server_dropped = final.get("frames_dropped")
    except FewstepError as e:
        rec.error = f"{type(e).__name__}: {e.message}"
    finally:
        if live:
            ok = rec.error is None and len(rec.arrivals) >= args.frames
            live.session(opened=-1, done=int(ok), failed=int(not ok))


def resolve_stream(args, served: list[dict] | None) -> None:
    """Fill in what a run sends from the server's model cards (``--model``'s, else the default video model):
    ``args.size`` (None: the model's native size), ``args.size_source``, ``args.resolved_model`` and
    ``args.resolved_fps`` (the target: --fps, else the card's). ValueError, before any session opens, for a size
    the model does not serve or a model a fewstep server does not list."""
    model = getattr(args, "model", None)
    card = pick_card(served, model, "video")
    if card is None and model is not None and served:
        raise ValueError(f"model {model!r} is not served at {args.url}; served: "
                         f"{', '.join(str(m.get('id')) for m in served)}")
    if card is not None and card.get("kind", "image") != "video":
        raise ValueError(f"model {card.get('id')!r} is an image model: streams need a video model "
                         "(use `fewstep bench images`)")
    args.size, args.size_source = resolve_size(card, args.size, fallback=None)
    args.resolved_model = (card or {}).get("id")
    args.resolved_fps = args.fps if args.fps is not None else (card or {}).get("fps")


async def bench_stream(args, *, progress: bool = False) -> dict[str, Any]:
    report, _ = await run_stream(args, progress=progress)
    return report


async def run_stream(args, *, progress: bool = False) -> tuple[dict[str, Any], list[SessionRecord]]:
    """:func:`bench_stream`, also returning the sessions' records (the plot draws them)."""
    records = [SessionRecord(i, args.seed + i) for i in range(args.sessions)]
    async with AsyncFewstepClient(args.url, timeout=args.timeout) as client:
        try:  # recorded so that the report names the model it measured; never fails the bench
            served = await client.models()
        except (FewstepError, httpx.HTTPError):  # an HTTP error answer, or none (the client wraps transport errors)
            served = None
        resolve_stream(args, served)
        print(f"bench stream: {describe_run(_config(args))}", file=sys.stderr, flush=True)

        date_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        with Progress(progress, args.sessions * args.frames, "frames", "frame") as bar:
            live = _Live(bar, args.sessions)

            async def run(rec: SessionRecord) -> None:
                await asyncio.sleep(rec.index * args.stagger_ms / 1e3)
                await asyncio.wait_for(_one_session(client, rec, args, live), args.timeout)

            results = await asyncio.gather(*(run(r) for r in records), return_exceptions=True)
            duration = time.perf_counter() - t0
            bar.set_postfix(live.postfix())
    for rec, res in zip(records, results):
        if isinstance(res, BaseException) and rec.error is None:
            rec.error = f"{type(res).__name__}: {res}"
    return build_report(records, args, duration, date_utc) | {"server_models": served}, records


def _config(args, records: Sequence[SessionRecord] = ()) -> dict[str, Any]:
    """The run's config; model / size / fps as the server's "started" message gave them where a session began."""
    started = next((r.started for r in records if r.started), {})
    size = args.size
    if started.get("width") and started.get("height"):
        size = f"{started['width']}x{started['height']}"
    fps = started.get("fps", getattr(args, "resolved_fps", args.fps))
    return {"url": args.url, "sessions": args.sessions, "frames": args.frames, "size": size, "fps": fps,
            "format": args.format, "prompt": args.prompt, "seed": args.seed, "stagger_ms": args.stagger_ms,
            "timeout_s": args.timeout, "model": started.get("model") or getattr(args, "resolved_model", None)
            or getattr(args, "model", None),
            "size_source": getattr(args, "size_source", "--size" if args.size else "server default"),
            "fps_requested": args.fps}


def _fps_text(fps: Any, requested: Any = None) -> str:
    if fps is None:
        return "model default"
    text = "unpaced (0)" if fps == 0 else f"{fps:g}"
    return text + (" (model default)" if requested is None else "")


def describe_run(cfg: dict[str, Any]) -> str:
    """One line: what a run opens (printed on stderr before it starts)."""
    return (f"model {cfg['model'] or 'server default'}, size {cfg['size'] or 'server default'} "
            f"({cfg['size_source']}), fps target {_fps_text(cfg['fps'], cfg['fps_requested'])}, {cfg['format']}, "
            f"{cfg['sessions']} sessions x {cfg['frames']} frames")


LENGTHS = (100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000)


def frame_cost_by_length(records: list[SessionRecord], window: int = 100) -> dict[str, float]:
    """Mean inter-frame time over the `window` frames that end at frame n, for n in LENGTHS reached by every
    session: does a frame cost the same at frame 10,000 as at frame 100? (Unbounded streams must stay flat.)"""
    out = {}
    live = [r for r in records if len(r.arrivals) > window]
    for n in LENGTHS:
        if not live or any(len(r.arrivals) < n for r in live):
            break
        out[str(n)] = statistics.fmean((r.arrivals[n - 1] - r.arrivals[n - 1 - window + 1]) * 1e3 / (window - 1)
                                       for r in live)
    return out


def build_report(records: list[SessionRecord], args, duration: float, date_utc: str) -> dict[str, Any]:
    ok = [r for r in records if r.error is None and len(r.arrivals) >= args.frames]
    gaps, chunk_gaps = [], []
    for r in records:
        d = [(b - a) * 1e3 for a, b in zip(r.arrivals, r.arrivals[1:])]
        gaps += d
        # a chunk boundary: the next frame starts a new chunk (index multiple of chunk_frames) or follows a drop
        first = r.first_chunk_frames if r.first_chunk_frames else r.chunk_frames
        chunk_gaps += [g for g, i, j in zip(d, r.indices, r.indices[1:])
                       if (j >= first and (j - first) % r.chunk_frames == 0) or j != i + 1]
    firsts = [r.arrivals[0] for r in records if r.arrivals]
    lasts = [r.arrivals[-1] for r in records if r.arrivals]
    delivered = sum(len(r.arrivals) for r in records)
    span = (max(lasts) - min(firsts)) if firsts else 0.0
    server_dropped = [r.server_dropped for r in records if r.server_dropped is not None]
    return {
        "schema": SCHEMA,
        "date_utc": date_utc,
        "fewstep_version": _fewstep_version(),
        "git_commit": git_commit(short=False, where=Path(__file__).resolve().parent),
        "config": _config(args, records),
        "sessions_completed": len(ok),
        "sessions_failed": len(records) - len(ok),
        "errors": [r.error for r in records if r.error][:10],
        "frames_delivered": delivered,
        "frames_dropped": sum(r.dropped for r in records),
        "server_frames_dropped": sum(server_dropped) if server_dropped else None,
        "duration_s": duration,
        "ttff_ms": _stats([r.ttff_ms for r in records if r.ttff_ms is not None]),
        "fps_per_session": _stats([r.fps for r in records if r.fps is not None]),
        "aggregate_fps": (delivered - len(firsts)) / span if span > 0 else None,
        "inter_frame_ms": _stats(gaps),
        "chunk_interval_ms": _stats(chunk_gaps),
        "frame_ms_by_length": frame_cost_by_length(records),
        "per_session": [{"session_id": r.session_id[:6] + "..." if r.session_id else "", "seed": r.seed,
                         "frames": len(r.arrivals), "ttff_ms": r.ttff_ms, "fps": r.fps, "dropped": r.dropped,
                         "server_dropped": r.server_dropped, "chunk_frames": r.chunk_frames, "error": r.error}
                        for r in records],
    }


def format_report(rep: dict[str, Any]) -> str:
    width = 60
    lines = [f"{' fewstep bench stream ':=^{width}}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "-" if value is None else (format(value, fmt) if fmt else str(value))
        lines.append(f"{label + ':':<40}{text:>{width - 40}}")

    cfg = rep["config"]
    row("URL", cfg["url"])
    row("Model", cfg.get("model") or "server default")
    source = cfg.get("size_source") or ""
    row("Size", (cfg.get("size") or "server default") + (" (native)" if source.startswith("native") else ""))
    row("Fps target", _fps_text(cfg.get("fps"), cfg.get("fps_requested", cfg.get("fps"))))
    row("Format", cfg["format"])
    row("Sessions x frames", f"{cfg['sessions']} x {cfg['frames']}")
    row("Sessions completed / failed", f"{rep['sessions_completed']} / {rep['sessions_failed']}")
    row("Frames delivered", rep["frames_delivered"])
    row("Frames dropped (index gaps)", rep["frames_dropped"])
    row("Frames dropped (server count)", rep["server_frames_dropped"])
    row("Duration (s)", rep["duration_s"], ".2f")
    row("Aggregate fps", rep["aggregate_fps"], ".2f")
    for key, label in (("ttff_ms", "Time to first frame (ms)"), ("fps_per_session", "Delivered fps per session"),
                       ("inter_frame_ms", "Inter-frame (ms)"), ("chunk_interval_ms", "Chunk interval (ms)")):
        s = rep.get(key)
        if s:
            row(f"{label} mean/p50/p99", f"{s['mean']:.2f} / {s['p50']:.2f} / {s['p99']:.2f}")
    for e in rep["errors"][:3]:
        lines.append(f"  error: {e[:width - 9]}")
    lines.append("=" * width)
    return "\n".join(lines)


def add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=4, help="concurrent stream sessions (default 4)")
    p.add_argument("--frames", type=int, default=100, help="frames each session receives (default 100)")
    p.add_argument("--size", default=None,
                   help='"WxH" or one side (default: the model\'s native size, from GET /v1/models; a size the model '
                   "does not serve is refused before the run)")
    p.add_argument("--model", default=None, help="video model id (default: the server's default video model)")
    p.add_argument("--fps", type=float, default=None, help="fps target per session (default: the model's; 0: unpaced)")
    p.add_argument("--format", default="jpeg", choices=["jpeg", "webp"], help="frame encoding (default jpeg)")
    p.add_argument("--prompt", default="a slow pan over a misty forest", help="the streams' prompt")
    p.add_argument("--seed", type=int, default=0, help="session i uses seed + i (default 0)")
    p.add_argument("--stagger-ms", type=float, default=0.0, help="delay between session starts (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-session timeout, s (default 600)")
    p.add_argument("--out", default=None,
                   help="write the JSON report to this file, and its plot next to it (bench.json -> bench.png: fps "
                   "over time, frame intervals per session; needs matplotlib)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress bar on stderr (default: on when stderr is a terminal)")


def run_stream_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.sessions < 1 or args.frames < 1:
        raise ValueError("--sessions and --frames must be >= 1")
    report, records = asyncio.run(run_stream(args, progress=progress_enabled(getattr(args, "progress", None))))
    print(format_report(report), flush=True)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"report written to {path}", file=sys.stderr)
        png = write_plot("stream", report, records, path)
        if png is not None:
            print(f"plot written to {png}", file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fewstep bench stream", description=__doc__.splitlines()[0])
    add_stream_args(parser)
    args = parser.parse_args(argv)
    try:
        report = run_stream_bench(args)
    except ValueError as e:
        parser.error(str(e))
    return 0 if report["frames_delivered"] else 1


if __name__ == "__main__":
    sys.exit(main())
