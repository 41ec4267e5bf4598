"""What the kernel benchmarks (`fewstep bench kernels`, `fewstep bench guidance`) share: the run's clock and log, the
timing rule, the environment every row records, the JSON they write and the section loop.

Imports triton: a benchmark sets TRITON_INTERPRET (--cpu-smoke) before it imports this module.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing

# the environment fields every row repeats (a row stays readable when copied out of its file)
ROW_ENV = ("gpu", "date", "torch", "triton")


class BenchRun:
    """One benchmark run: started now, on the GPU or (smoke) on the CPU under the Triton interpreter; collects rows
    and failures. ``env_extra`` (e.g. the dtype) goes into the environment and into every row."""

    def __init__(self, smoke: bool, **env_extra):
        self.t0 = time.perf_counter()
        self.smoke = smoke
        self.env = {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke
            else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "smoke": smoke,
            **env_extra,
        }
        self.row_env = (*ROW_ENV, *env_extra)
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed_s():6.1f}s] {msg}", flush=True)

    def bench_ms(self, fn: Callable[[], object]) -> float:
        """Median ms (triton.testing.do_bench: warm-up, L2 flush). CPU smoke: one timed call."""
        if self.smoke:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def add_row(self, **fields) -> None:
        self.rows.append({**{k: self.env[k] for k in self.row_env}, **fields})

    def start(self) -> bool:
        """Prints the environment; False (after saying why) where a GPU run finds no CUDA device."""
        if not self.smoke and not torch.cuda.is_available():
            print("no CUDA device: use --cpu-smoke on CPU")
            return False
        print(json.dumps(self.env))
        if self.smoke:
            print("cpu smoke: tiny shapes under the Triton interpreter; timings are meaningless")
        return True

    def run_sections(self, sections: str, table: dict[str, Callable[[], None]],
                     after_each: Callable[[], None] | None = None) -> None:
        """Runs the named sections in order; one failing is recorded and does not lose the others' results."""
        for s in sections:
            if s not in table:
                raise SystemExit(f"unknown section {s!r}")
            try:
                table[s]()
            except Exception as e:
                traceback.print_exc()
                self.failures.append(f"section {s}: {type(e).__name__}: {e}")
            if after_each is not None:
                after_each()

    def write_json(self, out: Path | None, name: str, args: dict, quiet: bool = False, **extra) -> None:
        """OUT/NAME: the environment, the arguments, ``extra``, the failures and the rows; nothing without --out."""
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / name
        path.write_text(json.dumps({"env": self.env, "args": {k: str(v) for k, v in args.items()}, **extra,
                                    "failures": self.failures, "rows": self.rows}, indent=1))
        if not quiet:
            self.log(f"wrote {path}")
