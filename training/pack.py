"""Move a run directory through the GPU machine's output folder (<= 8 files, each < 16 MB).

``fewstep train pack DIR DEST [--ckpt teacher distill]`` writes into DEST:

* ``fewstep_<name>.tar`` for each exported model folder in DIR (``teacher/``, ``student/``, or with
  ``--exports`` any others such as ``video_teacher/`` ``video_student/``; <= 12 MB each, fp16) -- an export has 9 files, so it travels as one tar;
* ``fewstep_meta.tar``: DIR's top-level logs / JSON / markdown / PNG and each checkpoint's
  ``state.json``;
* with ``--ckpt STAGE``: that stage's checkpoint shards ``STAGE_ckpt-g*-*.safetensors`` as they are
  (each < 15 MB).

``fewstep train unpack SRC DIR`` restores such a folder into DIR (tars extracted, shards put
back into ``DIR/STAGE_ckpt/``), so a later call can ``--resume`` or ``distill --teacher DIR/teacher``.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

from fewstep.training.common import log

MAX_FILE = 16_000_000
MAX_FILES = 8
MAX_TOTAL = 64_000_000
EXPORTS = ("teacher", "student")
META_SUFFIXES = (".json", ".jsonl", ".md", ".png", ".txt")
SHARD_RE = re.compile(r"^(?P<stage>[a-z_]+?)_ckpt-g\d+-\d+\.safetensors$")


def pack(run_dir: str | Path, dest: str | Path, exports: list[str] | None = None,
         ckpt: list[str] | None = None) -> list[Path]:
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in exports if exports is not None else EXPORTS:
        d = run_dir / name
        if (d / "model_index.json").exists():
            p = dest / f"fewstep_{name}.tar"
            with tarfile.open(p, "w") as tf:
                tf.add(d, arcname=name)
            written.append(p)
    meta = dest / "fewstep_meta.tar"
    with tarfile.open(meta, "w") as tf:
        for f in sorted(run_dir.iterdir()):
            if f.is_file() and f.suffix in META_SUFFIXES:
                tf.add(f, arcname=f.name)
        for st in sorted(run_dir.glob("*_ckpt/state.json")):
            tf.add(st, arcname=f"{st.parent.name}/state.json")
    written.append(meta)
    for stage in ckpt or []:
        d = run_dir / f"{stage}_ckpt"
        if not (d / "state.json").exists():
            raise FileNotFoundError(f"no checkpoint {d}")
        from fewstep.training.common import read_json
        for fname in read_json(d / "state.json")["shards"]:
            shutil.copy2(d / fname, dest / fname)
            written.append(dest / fname)
    sizes = {p.name: p.stat().st_size for p in written}
    total = sum(sizes.values())
    for name, sz in sizes.items():
        log(f"[pack] {dest / name}: {sz / 1e6:.2f} MB")
    problems = [f"{n} is {s / 1e6:.1f} MB (>= 16 MB)" for n, s in sizes.items() if s >= MAX_FILE]
    if len(written) > MAX_FILES:
        problems.append(f"{len(written)} files (> {MAX_FILES})")
    if total > MAX_TOTAL:
        problems.append(f"{total / 1e6:.1f} MB in all (> 64 MB)")
    for p in problems:
        log(f"[pack] WARNING: {p}: will not all come back from the GPU machine")
    log(f"[pack] {len(written)} files, {total / 1e6:.2f} MB in all")
    return written


def unpack(src: str | Path, run_dir: str | Path) -> None:
    src, run_dir = Path(src), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for t in sorted(src.glob("fewstep_*.tar")):
        with tarfile.open(t) as tf:
            try:
                tf.extractall(run_dir, filter="data")
            except TypeError:  # Python without extraction filters
                tf.extractall(run_dir)
        log(f"[unpack] {t.name} -> {run_dir}")
    for f in sorted(src.glob("*.safetensors")):
        m = SHARD_RE.match(f.name)
        if not m:
            continue
        d = run_dir / f"{m.group('stage')}_ckpt"
        d.mkdir(parents=True, exist_ok=True)
        if (d / f.name).resolve() != f.resolve():
            shutil.copy2(f, d / f.name)
        log(f"[unpack] {f.name} -> {d}")
