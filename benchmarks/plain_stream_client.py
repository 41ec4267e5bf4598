"""A WebSocket stream client with nothing of ours in it: `websockets` only, one session, ``start`` with ``fps: 0``,
frames counted after the first. It cross-checks ``fewstep bench stream`` (clients/bench_stream.py), which reports
the same two figures from the same definitions: delivered fps = (frames - 1) / (last arrival - first arrival), and
time to first frame from sending ``start``.

    fewstep bench plain-stream ws://127.0.0.1:8000/v1/stream --frames 2000 [--size 32x32] [--model ID]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def run(url: str, frames: int, size: str | None, model: str | None, prompt: str) -> dict:
    from websockets.asyncio.client import connect

    start = {"type": "start", "prompt": prompt, "fps": 0, "format": "jpeg"}
    if size:
        start["size"] = size
    if model:
        start["model"] = model
    arrivals: list[float] = []
    async with connect(url, max_size=None) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps(start))
        while len(arrivals) < frames:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                arrivals.append(time.perf_counter())
            elif json.loads(msg).get("type") in ("error", "stopped"):
                raise RuntimeError(msg)
        await ws.send(json.dumps({"type": "stop"}))
    span = arrivals[-1] - arrivals[0]
    return {"frames": len(arrivals), "fps": (len(arrivals) - 1) / span if span > 0 else None,
            "ttff_ms": (arrivals[0] - t0) * 1e3, "url": url, "size": size, "model": model}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep bench plain-stream", description=__doc__.splitlines()[0])
    p.add_argument("url", help="the stream socket, e.g. ws://127.0.0.1:8000/v1/stream")
    p.add_argument("--frames", type=int, default=2000, help="frames to receive (default 2000)")
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--model", default=None, help="model id (default: the server's video model)")
    p.add_argument("--prompt", default="a red circle moving right", help="the stream's prompt")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    print(json.dumps(asyncio.run(run(a.url, a.frames, a.size, a.model, a.prompt))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
