"""Running ``fewstep serve`` on this machine as a subprocess: the command line of the installed console script and a
free local port. Shared by the reliability report (benchmarks/reliability.py) and the tests (tests/conftest.py)."""

from __future__ import annotations

import platform
import socket
import sys
from pathlib import Path


def fewstep_command() -> list[str]:
    """The installed console script beside this interpreter (never `python -m` from the repository root, which puts
    the root on sys.path, where our kernels/ folder shadows PyPI's `kernels`)."""
    script = Path(sys.executable).with_name("fewstep")
    return [str(script)] if script.is_file() else [sys.executable, "-P", "-m", "fewstep.server.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    """The CPU's model name, for benchmark records (Linux's /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"
