"""Image encoding cost per 512x512 image: PIL on the host CPU (PNG, JPEG, WebP) against nvjpeg on the GPU.

    fewstep bench encode --out rows.jsonl

Content matters for the codecs, so two kinds of image are timed: "smooth" (gradients and flat shapes, like a
clean generated picture) and "noisy" (the same plus Gaussian noise of sigma 20, like random-weight model output,
the worst case for compression). CPU figures are one thread per image (the engine's encode pool runs several
images in parallel); the GPU figure is one batched nvjpeg call including the copy of the bytes to the host.
Medians over --iters after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from fewstep.benchmarks.pipeline_bench import device_name, git_commit
from fewstep.engines.encode import encode_image, encode_jpeg_gpu, gpu_jpeg_available


def images(kind: str, n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        img = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 40 * i % 255)], -1).astype(np.float32)
        img[size // 4: size // 2, size // 4: size // 2] = (200, 30, 30)
        if kind == "noisy":
            img += rng.normal(0, 20, img.shape)
        out.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep bench encode`, built without side effects (tests parse recorded commands)."""
    p = argparse.ArgumentParser(prog="fewstep bench encode", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="side of the square test images in pixels (default 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16],
                   help="images per nvjpeg call on the GPU; the CPU encodes one at a time (default 1 4 16)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per figure; the median is reported "
                   "(default 20)")
    p.add_argument("--out", help="append result rows (JSON lines) to this file (default: printed only)")
    return p


def main() -> None:
    p = build_parser()
    a = p.parse_args()
    meta = {"gpu": device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
            "command": " ".join(["fewstep", "bench", "encode", *sys.argv[1:]]), "size": a.size, "bench": "image_encode"}
    rows = []
    for kind in ("smooth", "noisy"):
        imgs = images(kind, max(a.batch), a.size)
        for fmt in ("png", "jpeg", "webp"):
            ms = median_ms(lambda: encode_image(imgs[0], fmt), a.iters)
            kb = len(encode_image(imgs[0], fmt)) / 1024
            rows.append(dict(meta, content=kind, encoder=f"cpu-{fmt}", batch=1, ms_per_image=round(ms, 3),
                             kb=round(kb, 1)))
        if torch.cuda.is_available() and gpu_jpeg_available(torch.device("cuda")):
            gpu = torch.from_numpy(imgs).cuda()
            for b in a.batch:
                def run():
                    encode_jpeg_gpu(gpu[:b])
                    torch.cuda.synchronize()
                ms = median_ms(run, a.iters, warmup=3)
                kb = len(encode_jpeg_gpu(gpu[:1])[0]) / 1024
                rows.append(dict(meta, content=kind, encoder="nvjpeg", batch=b, ms_per_image=round(ms / b, 3),
                                 ms_per_batch=round(ms, 3), kb=round(kb, 1)))
    for r in rows:
        print(f"{r['content']:<7} {r['encoder']:<9} batch {r['batch']:>3}: {r['ms_per_image']:7.2f} ms/image "
              f"{r['kb']:7.1f} KB")
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
