"""No folder of the repository may shadow an installed package, whatever is run from where.

Our top-level ``kernels/`` folder installs as ``fewstep.kernels``; PyPI also has a package ``kernels`` (a dependency
of transformers), which diffusers imports when present. A process that has the repository root on ``sys.path``
imports our folder in its place and fails (``cannot import name 'CUDAProperties' from 'kernels'``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FEWSTEP

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("server", "engines", "kernels", "clients", "benchmarks", "training")


def _ours(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(ROOT) and "site-packages" not in path


def test_no_top_level_folder_of_ours_is_importable_in_the_test_process():
    import diffusers  # noqa: F401  (imports PyPI's `kernels` where it is installed)

    root_on_path = [p for p in sys.path if Path(p or os.getcwd()).resolve() == ROOT]
    assert not root_on_path, ("the repository root is on sys.path: run the tests as `pytest`, not `python -m pytest` "
                              "from the root")
    for name in TOP_LEVEL:
        spec = importlib.util.find_spec(name)
        assert spec is None or not _ours(spec.origin), f"`import {name}` resolves to our folder: {spec.origin}"
        mod = sys.modules.get(name)
        assert mod is None or not _ours(getattr(mod, "__file__", None)), f"{name} imported from our folder"


def test_fewstep_packages_import_from_the_install():
    import fewstep.benchmarks
    import fewstep.kernels
    import fewstep.training

    assert Path(fewstep.kernels.__file__).parent.name == "kernels"
    assert fewstep.training.__name__ == "fewstep.training" and fewstep.benchmarks.__name__ == "fewstep.benchmarks"


PROBE = ("import sys, importlib.util, diffusers; s = importlib.util.find_spec('kernels'); "
         "print(s.origin if s else None)")


@pytest.mark.parametrize("how", ["console_script", "python_-P"])
def test_a_process_started_from_the_root_does_not_see_our_kernels(how):
    """The ways our docs start fewstep, from the repository root: neither may resolve `kernels` to our folder."""
    if how == "console_script":
        # the console script's interpreter with the script's own sys.path[0] (its bin folder), as `fewstep` runs
        cmd = [sys.executable, "-c", f"import sys; sys.path[0] = {str(Path(FEWSTEP[0]).parent)!r}; exec({PROBE!r})"]
    else:
        cmd = [sys.executable, "-P", "-c", PROBE]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert not _ours(None if origin == "None" else origin), f"`kernels` resolved to {origin}"


def test_the_probe_can_fail():
    """The same probe as plain `python -c` from the root (which puts the root first) does see our folder."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels')"
                          ".origin)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert _ours(out.stdout.strip()), out.stdout


@pytest.mark.parametrize("argv", [["train", "--help"], ["train", "study", "--help"], ["bench", "pipeline", "--help"],
                                  ["bench", "quality", "--help"], ["bench", "report", "--help"],
                                  ["bench", "kernels-quality", "--help"], ["bench", "encode", "--help"],
                                  ["bench", "random-weights", "--help"]])
def test_entry_points_run_from_the_repository_root(argv):
    out = subprocess.run([*FEWSTEP, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout.lower()


def test_no_shipped_module_edits_sys_path():
    """Code that puts a folder on sys.path brings the shadowing back (a benchmark once inserted the repo root)."""
    offenders = []
    for folder in TOP_LEVEL:
        for f in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if "sys.path.insert" in line or "sys.path.append" in line or "sys.path[0:0]" in line:
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders
