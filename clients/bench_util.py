"""Helpers shared by ``fewstep bench images`` and ``fewstep bench stream``: the served model and its sizes
(``GET /v1/models``), a live progress bar on stderr, and the PNG plot written next to a JSON report.

Sizes
-----
A fewstep model card carries ``default_size`` (the native side, px) and ``sizes``, the text of
``engines/sizes.py``'s ``ServedSizes.describe()``: comma-separated exact ``"WxH"`` sizes and at most one
``"any WxH with sides from LO to HI px[ in steps of S]"``. :func:`resolve_size` picks the size a run uses (the
native one when none is given, as the server does for work that names no size) and refuses, before the run, a
size the card says the model does not serve.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import statistics
import sys
import time
from pathlib import Path
from typing import IO, Any, Sequence

__all__ = [
    "pick_card",
    "served_sizes",
    "size_served",
    "resolve_size",
    "progress_enabled",
    "Progress",
    "plot_path",
    "write_plot",
]

_WXH = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_RANGE = re.compile(r"any WxH with sides from (\d+) to (\d+) px(?: in steps of (\d+))?")


# ------------------------------------------------------------------------------------------------- models, sizes


def pick_card(models: Sequence[dict] | None, model: str | None, kind: str) -> dict | None:
    """The card a run measures: the one of ``model`` when named, else the server's default for ``kind``
    ("image" or "video"): the first card of that kind, else the first card (as engines/core.py picks it).
    None when the server listed nothing (not fewstep, or no /v1/models) or does not list ``model``."""
    cards = [m for m in models or () if isinstance(m, dict)]
    if model is not None:
        return next((m for m in cards if m.get("id") == model), None)
    of_kind = [m for m in cards if m.get("kind", "image") == kind]
    return (of_kind or cards or [None])[0]


def served_sizes(text: str | None) -> tuple[list[tuple[int, int]], tuple[int, int, int] | None]:
    """``ModelCard.sizes`` -> (exact (width, height) sizes, (lo, hi, step) side range or None)."""
    exact: list[tuple[int, int]] = []
    side_range = None
    for part in (text or "").split(","):
        part = part.strip()
        m = _WXH.match(part)
        if m:
            exact.append((int(m[1]), int(m[2])))
            continue
        r = _RANGE.search(part)
        if r:
            side_range = (int(r[1]), int(r[2]), int(r[3] or 1))
    return exact, side_range


def size_served(text: str | None, width: int, height: int) -> bool | None:
    """Whether the card's ``sizes`` text allows ``width`` x ``height``; None when it says nothing we can read."""
    exact, side_range = served_sizes(text)
    if not exact and side_range is None:
        return None
    if (width, height) in exact:
        return True
    if side_range is None:
        return False
    lo, hi, step = side_range
    return all(lo <= v <= hi and v % step == 0 for v in (width, height))


def parse_wxh(size: str | int) -> tuple[int, int]:
    """``"WxH"`` or one side (a square) -> (width, height); ValueError otherwise."""
    if isinstance(size, int) or (isinstance(size, str) and size.strip().isdigit()):
        side = int(size)
        if side > 0:
            return side, side
    m = _WXH.match(size) if isinstance(size, str) else None
    if not m or not int(m[1]) or not int(m[2]):
        raise ValueError(f"--size must look like WxH (e.g. 64x64), got {size!r}")
    return int(m[1]), int(m[2])


def resolve_size(card: dict | None, size: str | None, *, fallback: str | None) -> tuple[str | None, str]:
    """(size to send as "WxH", where it came from) for a run on the model of ``card``.

    ``size`` None: the model's native size (``default_size``) when it is served, else its first served size;
    ``fallback`` where the server lists no size (an OpenAI-compatible server that is not fewstep). A given size
    the card's ``sizes`` does not allow raises ValueError naming the served sizes, before anything is sent."""
    model = (card or {}).get("id")
    sizes = (card or {}).get("sizes")
    if size is not None:
        w, h = parse_wxh(size)
        if size_served(sizes, w, h) is False:
            raise ValueError(f"--size {w}x{h} is not served by model {model!r}; served sizes: {sizes}")
        return f"{w}x{h}", "--size"
    native = (card or {}).get("default_size")
    if isinstance(native, int) and native > 0 and size_served(sizes, native, native) is not False:
        return f"{native}x{native}", f"native size of {model}"
    exact, side_range = served_sizes(sizes)
    if exact:
        return f"{exact[0][0]}x{exact[0][1]}", f"first size served by {model}"
    if side_range is not None:
        lo, _, step = side_range
        side = -(-lo // step) * step
        return f"{side}x{side}", f"smallest size served by {model}"
    return fallback, "not listed by the server; " + (f"default {fallback}" if fallback else "server default")


# -------------------------------------------------------------------------------------------------------- progress


def progress_enabled(flag: bool | None, stream: IO[str] | None = None) -> bool:
    """``--progress`` (True) forces the bar on, ``--no-progress`` (False) off; unset: on when ``stream`` (stderr)
    is a terminal, so that a log file or a CI run gets no carriage-return noise."""
    if flag is not None:
        return bool(flag)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class Progress:
    """A tqdm bar on stderr (never stdout, where ``--out -``-style JSON and the report go), or nothing.

    ``update(n, **postfix)`` advances it; the postfix (rate, p50, ...) is redrawn at most every ``interval``
    seconds, so a fast run does not spend its time formatting the bar."""

    def __init__(self, enabled: bool, total: int | None, desc: str, unit: str, *, file: IO[str] | None = None,
                 interval: float = 0.25):
        self.enabled = enabled
        self._bar = None
        self._last = 0.0
        self.interval = interval
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=file or sys.stderr, dynamic_ncols=True,
                             mininterval=interval, leave=True, smoothing=0.3)

    def update(self, n: int = 1, postfix: str | None = None, *, force: bool = False) -> None:
        if self._bar is None:
            return
        now = time.monotonic()
        if postfix is not None and (force or now - self._last >= self.interval):
            self._last = now
            self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n)

    def set_postfix(self, postfix: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def git_commit(short: bool = True, where: str | Path | None = None) -> str | None:
    """The commit that measurements ran: ``FEWSTEP_COMMIT`` when set (a copied work tree, such as the GPU machine's,
    can carry stale git metadata under newer files: the script that copied it knows the commit), else git's HEAD
    of the checkout at ``where`` (default: the working directory), with "+dirty" when tracked files differ.
    None outside a checkout or without git."""
    given = os.environ.get("FEWSTEP_COMMIT", "").strip()
    if given:
        return given
    cwd = str(where) if where is not None else None
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=cwd,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None

# ------------------------------------------------------------------------------------------------------------ plot


def plot_path(out: str | Path) -> Path:
    """``bench.json`` -> ``bench.png`` (next to the JSON report)."""
    return Path(out).with_suffix(".png")


def _figure(rows: int, cols: int, title: str):
    """A matplotlib Figure (no pyplot: no global backend, no display needed); None when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6.0 * cols, 4.0 * rows), layout="constrained")
    fig.suptitle(title, fontsize=11)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def _bins(span: float, target: int = 30) -> float:
    """A round bin width (s) giving about ``target`` bins over ``span`` seconds."""
    raw = max(span, 1e-3) / target
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def images_figure(report: dict[str, Any], records: Sequence[Any]):
    """Latency histogram + CDF, and throughput (completed req/s) over time, of one ``bench images`` run."""
    cfg = report.get("config", {})
    made = _figure(1, 3, f"fewstep bench images: {cfg.get('served_model') or cfg.get('model') or '-'} {cfg.get('size')} "
                         f"steps={cfg.get('steps') or cfg.get('model_default_steps') or 'default'}, {_load_text(cfg)}, {report['completed']} ok / "
                         f"{report['failed']} failed")
    if made is None:
        return None
    fig, (ax_lat, ax_tp, ax_wf) = made
    ok = [r for r in records if r.ok]
    lat = sorted(r.latency_ms for r in ok)
    if lat:
        ax_lat.hist(lat, bins=min(40, max(5, len(lat) // 2)), color="tab:blue", alpha=0.6)
        ax_cdf = ax_lat.twinx()
        ax_cdf.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color="tab:red", lw=1.5)
        ax_cdf.set_ylim(0, 1.02)
        ax_cdf.set_ylabel("CDF", color="tab:red")
        for q in ("p50", "p99"):
            v = (report.get("latency_ms") or {}).get(q)
            if v is not None:
                ax_lat.axvline(v, color="k", ls="--" if q == "p50" else ":", lw=1, label=f"{q} {v:.1f} ms")
        ax_lat.legend(loc="center right", fontsize=8)
    else:
        ax_lat.text(0.5, 0.5, "no successful request", ha="center", transform=ax_lat.transAxes)
    ax_lat.ticklabel_format(axis="x", useOffset=False)
    ax_lat.set_xlabel("end-to-end latency (ms)")
    ax_lat.set_ylabel("requests")
    ax_lat.set_title("latency distribution")

    done = sorted(r.start_s + r.latency_ms / 1e3 for r in ok)
    if done:
        width = _bins(done[-1])
        n = int(done[-1] // width) + 1
        counts = [0] * n
        for t in done:
            counts[min(int(t // width), n - 1)] += 1
        ax_tp.bar([(i + 0.5) * width for i in range(n)], [c / width for c in counts], width=width * 0.9,
                  color="tab:green", alpha=0.7, label=f"per {width:g} s")
        ax_tp.axhline(report["request_throughput"], color="k", ls="--", lw=1,
                      label=f"mean {report['request_throughput']:.2f} req/s")
        ax_tp.legend(fontsize=8)
    ax_tp.set_xlabel("time since start (s)")
    ax_tp.set_ylabel("completed requests / s")
    ax_tp.set_title("throughput over time")
    _waterfall(ax_wf, report.get("waterfall_ms"))
    return fig


def _waterfall(ax, wf: dict[str, Any] | None) -> None:
    """One horizontal bar per part of a request's span, each starting where the previous ended (means, ms)."""
    ax.set_title("where a request's time goes (mean)")
    if not wf:
        ax.text(0.5, 0.5, "the server reported no span\n(not a fewstep server?)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    stages = wf["stages"]
    left = 0.0
    for i, st in enumerate(stages):
        width = max(st["mean"], 0.0)
        ax.barh(i, width, left=left, color=f"C{i % 10}")
        ax.text(left + width, i, f" {st['mean']:.2f}", va="center", fontsize=7)
        left += width
    ax.set_yticks(range(len(stages)), [st["stage"] for st in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms from the client's send (total {left:.1f} ms, {wf['requests']} requests)")


def stream_figure(report: dict[str, Any], records: Sequence[Any]):
    """Delivered fps over time (all sessions together and each), and every session's frame intervals."""
    cfg = report.get("config", {})
    made = _figure(1, 2, f"fewstep bench stream: {cfg.get('model') or '-'} {cfg.get('size')}, fps target "
                         f"{_fps_text(cfg.get('fps'))}, {cfg.get('sessions')} sessions x {cfg.get('frames')} frames")
    if made is None:
        return None
    fig, (ax_fps, ax_gap) = made
    firsts = [r.t_open for r in records if r.arrivals]
    if firsts:
        t0 = min(firsts)
        last = max(r.arrivals[-1] for r in records if r.arrivals) - t0
        width = _bins(last, 25)
        n = int(last // width) + 1
        total = [0] * n
        for r in records:
            per = [0] * n
            for a in r.arrivals:
                i = min(int((a - t0) // width), n - 1)
                per[i] += 1
                total[i] += 1
            if len(records) > 1:
                ax_fps.step([(i + 0.5) * width for i in range(n)], [c / width for c in per], where="mid", lw=0.8,
                            alpha=0.6, label=f"session {r.index}")
        ax_fps.step([(i + 0.5) * width for i in range(n)], [c / width for c in total], where="mid", color="k", lw=1.8,
                    label="all sessions")
        target = cfg.get("fps")
        if isinstance(target, (int, float)) and target > 0:
            ax_fps.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target:g} fps / session")
        ax_fps.legend(fontsize=7)
    else:
        ax_fps.text(0.5, 0.5, "no frame delivered", ha="center", transform=ax_fps.transAxes)
    ax_fps.set_xlabel("time since the earliest session start (s)")
    ax_fps.set_ylabel("frames / s delivered")
    ax_fps.set_title("fps over time")
    for r in records:
        gaps = [(b - a) * 1e3 for a, b in zip(r.arrivals, r.arrivals[1:])]
        if gaps:
            ax_gap.plot(range(1, len(gaps) + 1), gaps, marker=".", ms=3, lw=0.7, label=f"session {r.index}")
    ax_gap.set_xlabel("frame")
    ax_gap.set_ylabel("interval since the previous frame (ms)")
    ax_gap.set_title("frame intervals per session")
    if any(len(r.arrivals) > 1 for r in records):
        ax_gap.legend(fontsize=7)
    return fig


def write_plot(kind: str, report: dict[str, Any], records: Sequence[Any], out: str | Path,
               err: IO[str] | None = None) -> Path | None:
    """Draw ``kind`` ("images" / "stream") to the PNG next to ``out``; None (and a note on stderr) without
    matplotlib."""
    err = err or sys.stderr
    fig = (images_figure if kind == "images" else stream_figure)(report, records)
    if fig is None:
        print("matplotlib is not installed (pip install 'fewstep[bench]'): no plot written", file=err)
        return None
    path = plot_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _load_text(cfg: dict[str, Any]) -> str:
    if cfg.get("mode") == "poisson":
        text = f"poisson {cfg.get('request_rate')} req/s"
        return text + (f", max {cfg['max_concurrency']} in flight" if cfg.get("max_concurrency") else "")
    return f"concurrency {cfg.get('concurrency')}"


def _fps_text(fps: Any) -> str:
    if fps is None:
        return "model default"
    return "unpaced (0)" if fps == 0 else f"{fps:g}"
