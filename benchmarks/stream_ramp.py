"""`fewstep bench ramp`: a stream's warm-up ramp (``StreamConfig.ramp``: full, trim, jump) on a video checkpoint,
in-process: the work and time to a new session's first frame, and the quality of the frames the ramps give.

Work before the first frame is counted, not timed: denoiser calls and frames through the denoiser (the session's
``forwards`` and ``denoised_frames``), which do not depend on how busy the machine is. The wall time from a session's
open to its first chunk (prompt encoding, the ramp's steps, decode; raw frames, nothing encoded) is the median of
``--repeats`` fresh sessions per ramp, run in rotation so drift on a shared machine spreads over all of them.

Quality: ``--n`` held-out video prompts (seeds 0..n-1, the same for every ramp, so every difference comes from the
ramp) streamed ``--frames`` frames each, all sessions stepped together, scored as ``fewstep train video-eval``
scores a stream (training/video.py ``score_stream``: frame strict adherence, chunk adherence, identity consistency,
motion): over the whole run, and over the stream's first ``--head-chunks`` chunks alone (where the ramps differ).
One JSON row per ramp to ``--out`` (appended) and to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RAMPS = ("full", "trim", "jump")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fewstep bench ramp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a video checkpoint folder (default: the embedded video model)")
    ap.add_argument("--ramps", nargs="+", choices=RAMPS, default=list(RAMPS), help="ramps compared (default all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=20, help="fresh sessions timed per ramp (default 20)")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts streamed per ramp for quality (default 64; "
                    "0: no quality)")
    ap.add_argument("--frames", type=int, default=300, help="frames per quality stream (default 300)")
    ap.add_argument("--head-chunks", type=int, default=None, help="first chunks scored on their own (default: the "
                    "buffer's chunk count K)")
    ap.add_argument("--seed", type=int, default=7, help="picks the held-out prompts (default 7)")
    ap.add_argument("--out", default=None, help="append one JSON row per ramp to this .jsonl (default: stdout only)")
    return ap


def _commit() -> str:
    from fewstep.clients.bench_util import git_commit

    return git_commit(where=Path(__file__).resolve().parent) or "unknown"


def first_frame(pipe, ramp: str, prompt: str, seed: int) -> dict:
    """One fresh session on a fresh engine: steps to its first chunk; its work and open-to-chunk wall time."""
    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.core import EngineCore
    from fewstep.engines.stream import StreamStart

    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig(ramp=ramp)))
    try:
        t0 = time.perf_counter()
        s = core.open_stream(StreamStart(prompt=prompt, seed=seed, fps=0, format="raw"))
        while s.first_chunk_at is None:
            core.stream_step()
        ms = (s.first_chunk_at - t0) * 1e3
        return {"ms": ms, "steps": s.steps, "forwards": s.forwards, "denoised_frames": s.denoised_frames}
    finally:
        core.shutdown()


def quality(pipe, ramp: str, prompts: list[str], frames: int, head: int) -> dict:
    from fewstep.benchmarks.quality import stream_frames
    from fewstep.training.video import aggregate, score_stream

    F = pipe.chunk_frames
    vids = stream_frames(pipe, prompts, frames, ramp=ramp)
    whole = aggregate([score_stream(v, p, F) for v, p in zip(vids, prompts)])
    first = aggregate([score_stream(v[: head * F], p, F) for v, p in zip(vids, prompts)])
    keys = ("frame_strict_adherence", "chunk_adherence", "identity_consistency", "motion_accuracy",
            "frame_adherence")
    return {"whole": {k: whole[k] for k in keys}, "head": {k: first[k] for k in keys}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.stream import StreamPipeline
    from fewstep.server.config import DEFAULT_VIDEO_MODEL_DIR
    from fewstep.training import data as D

    commit = _commit()  # of the checkout that runs, read before anything else can change it
    model = args.model or str(DEFAULT_VIDEO_MODEL_DIR)
    pipe = StreamPipeline(load_checkpoint(model))
    K, F = pipe.buffer_chunks, pipe.chunk_frames
    head = args.head_chunks or K
    rng = np.random.default_rng(args.seed)
    prompts = [D.sample_video_scene(rng, "heldout").caption for _ in range(max(args.n, 1))]

    first_frame(pipe, "full", prompts[0], 0)  # warm the allocator and the prompt cache's code paths
    times: dict[str, list[dict]] = {r: [] for r in args.ramps}
    for i in range(args.repeats):  # in rotation: machine drift spreads over every ramp
        for r in args.ramps:
            times[r].append(first_frame(pipe, r, prompts[i % len(prompts)], i))
    command = "fewstep bench ramp " + " ".join(argv if argv is not None else sys.argv[1:])
    env = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)" \
        if pipe.device.type == "cpu" else torch.cuda.get_device_name(pipe.device)
    rows = []
    for r in args.ramps:
        t = times[r]
        row = {"bench": "stream_ramp", "gpu": env, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "command": command, "model": "default-video" if args.model is None else model,
               "K": K, "F": F, "ramp": r, "forwards_to_first_frame": t[0]["forwards"],
               "steps_to_first_frame": t[0]["steps"], "denoised_frames_to_first_frame": t[0]["denoised_frames"],
               "first_frame_ms_p50": round(statistics.median(x["ms"] for x in t), 2),
               "first_frame_ms_min": round(min(x["ms"] for x in t), 2), "repeats": args.repeats}
        if args.n > 0:
            row.update({"prompts": args.n, "frames": args.frames, "head_chunks": head,
                        **quality(pipe, r, prompts, args.frames, head)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
