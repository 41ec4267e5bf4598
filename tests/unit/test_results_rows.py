"""Every measured row in benchmarks/results says on which card, when, at which commit and by which command it was made.

The command must run: it starts with `fewstep `, the real parser of that tool accepts its arguments (parsed only,
nothing runs), and it agrees with the row it made (size, batch, system; concurrency, sessions, ...). A command that
cannot be that says why in `command_status`. `$OUT` is the one documented placeholder (benchmarks/results/README.md):
the run's output folder, at the start of a path or as a device script's argument; no other shell variable is left
unexpanded. The last tests feed the validator bad rows and check that it reports each one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"

# Cards a row may name: NVIDIA data-centre and workstation parts (optionally with a memory/form suffix, as
# torch.cuda.get_device_name writes them), or the CPU.
KNOWN_GPU = re.compile(
    r"^NVIDIA (H100|H200|H20|GH200|B200|GB200|A100|A10G?|A30|A40|L4|L40S?|T4|V100|RTX (A\d000|\d000 Ada)"
    r"|GeForce RTX \d{4}( Ti)?)( .+)?$"
    r"|^cpu$|^CPU( \(.+\))?$"
)
COMMIT = re.compile(r"^[0-9a-f]{7,40}(\+dirty)?$")
SHELL_VAR = re.compile(r"\$(\{?[A-Za-z_][A-Za-z0-9_]*\}?)")
PLACEHOLDER = "$OUT"
# command_status values that claim the command is exact and runnable; any other status explains why it is not
RUNNABLE_STATUS = ("repaired", "reconstructed")
# phrases about how the project was written, not about what was measured ("sessions" of a stream stay)
PROVENANCE = re.compile(
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|this|next|previous|last)"
    r" session\b|\bissue [0-9]|\bdevice call|\bcall [0-9]",
    re.IGNORECASE,
)


# ---- the tools' real parsers -------------------------------------------------------------------------------------

def _images_parser() -> argparse.ArgumentParser:
    from fewstep.clients.bench import add_images_args

    p = argparse.ArgumentParser(prog="fewstep bench images")
    add_images_args(p)
    return p


def _stream_parser() -> argparse.ArgumentParser:
    from fewstep.clients.bench_stream import add_stream_args

    p = argparse.ArgumentParser(prog="fewstep bench stream")
    add_stream_args(p)
    return p


def _module_parser(module: str) -> argparse.ArgumentParser | None:
    import importlib

    path = sys.path[:]
    try:  # quality_block_sparse puts the repo root on sys.path when imported (where kernels/ shadows PyPI's): undo
        build = getattr(importlib.import_module(module), "build_parser", None)
        return None if build is None else build()
    finally:
        sys.path[:] = path


@functools.cache
def tool_parser(tool: tuple[str, ...]) -> argparse.ArgumentParser | None:
    """The parser of `fewstep TOOL...` (tool = ("bench", "pipeline"), ("serve",), ...); None: no such tool."""
    if tool == ("bench", "images"):
        return _images_parser()
    if tool == ("bench", "stream"):
        return _stream_parser()
    if tool == ("bench", "kernels"):
        pytest.importorskip("triton")  # the kernel benchmark imports triton when its module loads
    if len(tool) == 2 and tool[0] == "bench":
        from fewstep.server.cli import BENCH_TOOLS

        return _module_parser(BENCH_TOOLS[tool[1]][0]) if tool[1] in BENCH_TOOLS else None
    if tool == ("serve",):
        from fewstep.server.cli import build_parser

        return build_parser()
    return None


def parse_command(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parse `fewstep ...` argv with the tool's own parser: (namespace, None) or (None, why not)."""
    if not argv or argv[0] != "fewstep":
        return None, "does not start with `fewstep `"
    tool = tuple(argv[1:3]) if len(argv) > 1 and argv[1] == "bench" else tuple(argv[1:2])
    parser = tool_parser(tool)
    if parser is None:
        return None, f"no tool `fewstep {' '.join(tool)}` with a parser"
    rest = argv[1 + len(tool):] if tool != ("serve",) else argv[1:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(rest)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        return None, f"`fewstep {' '.join(tool)}` rejects it: {msg[-1] if msg else 'exit'}"
    return ns, None


# ---- the validator -----------------------------------------------------------------------------------------------

def shell_var_problems(command: str) -> list[str]:
    """Unexpanded shell variables other than the documented $OUT placeholder, and $OUT anywhere but a path's start."""
    out = []
    for m in SHELL_VAR.finditer(command):
        if m.group(0) != PLACEHOLDER:
            out.append(f"unexpanded shell variable {m.group(0)}")
    try:
        words = shlex.split(command)
    except ValueError as e:
        return out + [f"command does not split as shell words: {e}"]
    for w in words:
        if PLACEHOLDER in w and not (w == PLACEHOLDER or (w.startswith(PLACEHOLDER + "/") and w.count("$") == 1)):
            out.append(f"garbled use of $OUT in {w[:40]!r}")
    return out


def check_date(value) -> list[str]:
    if not isinstance(value, str) or not value:
        return ["date missing"]
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return [f"date {value!r} is not ISO 8601"]
    return []


def check_meta(gpu, date, commit) -> list[str]:
    errs = []
    if not isinstance(gpu, str) or not gpu:
        errs.append("gpu missing")
    elif not KNOWN_GPU.match(gpu):
        errs.append(f"gpu {gpu!r} is not a known card or CPU")
    errs += check_date(date)
    if not isinstance(commit, str) or not commit:
        errs.append("commit missing")
    elif not COMMIT.match(commit):
        errs.append(f"commit {commit!r} is not a hex hash")
    return errs


def check_command(command, status, agrees=None) -> list[str]:
    """command: the text; status: its command_status or None; agrees(ns) -> list of disagreements with the row."""
    if not isinstance(command, str) or not command.strip():
        return ["command missing"]
    errs = shell_var_problems(command)
    if status is not None and (not isinstance(status, str) or not status.strip()):
        errs.append("command_status is empty")
    try:
        argv = shlex.split(command)
    except ValueError:
        return errs
    ns, why = parse_command(argv)
    explained = isinstance(status, str) and status.strip() and not status.startswith(RUNNABLE_STATUS)
    if ns is None:
        if not explained:
            errs.append(f"command not runnable ({why}) and no command_status says why")
    elif agrees is not None:
        errs += agrees(ns)
    return errs


def pipeline_agrees(row: dict):
    def check(a: argparse.Namespace) -> list[str]:
        errs = []
        if "size" in row and row["size"] not in a.size:
            errs.append(f"row size {row['size']} not in --size {a.size}")
        if "batch" in row and row["batch"] not in a.batch:
            errs.append(f"row batch {row['batch']} not in --batch {a.batch}")
        if "steps" in row and row["steps"] != a.steps:
            errs.append(f"row steps {row['steps']} != --steps {a.steps}")
        system = row.get("system", "")
        if system.startswith("fewstep-"):
            backend = system.removeprefix("fewstep-").split("+")[0]
            if backend not in a.backend:
                errs.append(f"row system {system} not among --backend {a.backend}")
            if ("+fqkv" in system) != a.fuse_qkv or ("+dyn" in system) != a.dynamic_batch:
                errs.append(f"row system {system} disagrees with --fuse-qkv/--dynamic-batch")
        elif system.startswith("diffusers-") and system not in a.baseline:
            errs.append(f"row system {system} not among --baseline {a.baseline}")
        if a.dtype != "auto" and row.get("dtype") not in (None, a.dtype):
            errs.append(f"row dtype {row.get('dtype')} != --dtype {a.dtype}")
        return errs
    return check


def encode_agrees(row: dict):
    def check(a: argparse.Namespace) -> list[str]:
        errs = []
        if row.get("size") != a.size:
            errs.append(f"row size {row.get('size')} != --size {a.size}")
        if row.get("batch") not in a.batch:
            errs.append(f"row batch {row.get('batch')} not in --batch {a.batch}")
        return errs
    return check


def config_agrees(config: dict, keys: tuple[str, ...]):
    def check(a: argparse.Namespace) -> list[str]:
        # a size the command left to the server (no --size) is what the server chose: nothing to agree with
        chosen = {"size"} if getattr(a, "size", None) is None and config.get("size_source") else set()
        return [f"config {k}={config.get(k)!r} but the command gives {getattr(a, k)!r}"
                for k in keys if k in config and k not in chosen and getattr(a, k) != config[k]]
    return check


def check_row(row: dict) -> list[str]:
    """Problems of one *.jsonl row (empty: fine)."""
    errs = check_meta(row.get("gpu"), row.get("date"), row.get("commit"))
    if "command_recorded" in row and "command_status" not in row:
        errs.append("command_recorded without a command_status")
    cmd = row.get("command")
    agrees = (encode_agrees(row) if row.get("bench") == "image_encode" else
              pipeline_agrees(row) if isinstance(cmd, str) and cmd.startswith("fewstep bench pipeline") else None)
    return errs + check_command(cmd, row.get("command_status"), agrees)


def check_report(rep: dict, kind: str) -> list[str]:
    """Problems of one JSON report: kind is "http", "stream", "kernels-quality" or "kernels"."""
    if kind in ("http", "stream"):
        keys = (("concurrency", "num_requests", "warmup", "size", "steps", "output_format") if kind == "http"
                else ("sessions", "frames", "size", "fps"))
        errs = check_meta(rep.get("gpu"), rep.get("date_utc"), rep.get("git_commit"))
        errs += check_command(rep.get("command"), rep.get("command_status"), config_agrees(rep.get("config", {}), keys))
        server_cmd = (rep.get("server") or {}).get("command")
        if server_cmd is not None:  # a description of the run's server: no garbling, no stray variables
            errs += [f"server.command: {e}" for e in shell_var_problems(server_cmd)]
        return errs
    if kind == "kernels-quality":
        m = rep.get("meta") or {}
        return (check_meta((m.get("env") or {}).get("device"), m.get("date"), m.get("commit")) +
                check_command(m.get("command"), m.get("command_status")))
    if kind == "kernels":  # env + args only (no commit, no command line): the args must be the tool's own
        env, args = rep.get("env") or {}, rep.get("args") or {}
        errs = check_meta(env.get("gpu"), env.get("date"), "0000000")
        parser = tool_parser(("bench", "kernels"))
        dests = {a.dest: a for a in parser._actions if a.dest != "help"}
        if set(args) != set(dests):
            errs.append(f"args {sorted(set(args) ^ set(dests))} differ from the parser's options")
        return errs
    raise ValueError(kind)


# ---- the rows in the repository ----------------------------------------------------------------------------------

def _jsonl_rows():
    for f in sorted(RESULTS.glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                yield pytest.param(f, i, line, id=f"{f.name}:{i}")


def _reports():
    for kind in ("http", "stream"):
        for f in sorted((RESULTS / kind).glob("*/*.json")):
            yield pytest.param(f, kind, id=str(f.relative_to(RESULTS)))
    for f in sorted((RESULTS / "kernels").glob("*.json")):
        kind = "kernels-quality" if "meta" in json.loads(f.read_text()) else "kernels"
        yield pytest.param(f, kind, id=str(f.relative_to(RESULTS)))


def test_parsing_leaves_sys_path_alone():
    before = sys.path[:]
    for tool in (("bench", "pipeline"), ("bench", "encode"), ("bench", "kernels-quality"), ("bench", "images")):
        assert tool_parser(tool) is not None
    assert sys.path == before


def test_results_exist():
    assert len(list(_jsonl_rows())) >= 100 and len(list(_reports())) >= 20


@pytest.mark.parametrize("path,lineno,line", list(_jsonl_rows()))
def test_jsonl_row(path, lineno, line):
    assert check_row(json.loads(line)) == []


@pytest.mark.parametrize("path,kind", list(_reports()))
def test_report(path, kind):
    assert check_report(json.loads(path.read_text()), kind) == []


def test_no_notes_about_how_the_project_was_written():
    hits = [f"{f.relative_to(RESULTS)}:{i}: {m.group(0)}"
            for f in sorted(RESULTS.rglob("*")) if f.is_file() and f.suffix in (".jsonl", ".json", ".md", ".log")
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            for m in PROVENANCE.finditer(line)]
    assert hits == []


# ---- the validator fails on bad rows -----------------------------------------------------------------------------

GOOD = {"gpu": "NVIDIA H200", "date": "2026-11-29T17:02:12+00:00", "commit": "5573441", "arch": "sd-turbo", "steps": 1,
        "dtype": "float16", "size": 512, "system": "fewstep-compiled", "batch": 16,
        "command": "fewstep bench pipeline --config benchmarks/configs/sd-turbo --size 512 --batch 16 --iters 10 "
                   "--warmup 2 --format jpeg --backend eager compiled --baseline diffusers-eager diffusers-compile "
                   "--out $OUT/sd16.jsonl"}
GARBLED = "$OUT/" + "$OUT/".join("python -m benchmarks.pipeline_bench --size 512 --batch 16") + "$OUT/"


def test_validator_accepts_a_good_row():
    assert check_row(GOOD) == []


@pytest.mark.parametrize("change,expect", [
    ({"gpu": None}, "gpu missing"),
    ({"gpu": ""}, "gpu missing"),
    ({"gpu": "Quantum Abacus 9000"}, "not a known card"),
    ({"date": "yesterday"}, "not ISO 8601"),
    ({"date": None}, "date missing"),
    ({"commit": "not-a-hash"}, "not a hex hash"),
    ({"command": ""}, "command missing"),
    ({"command": GARBLED}, "garbled use of $OUT"),
    ({"command": GARBLED}, "command not runnable"),
    ({"command": GOOD["command"].replace("$OUT/sd16", "$OUT/p$OUT/sd16")}, "garbled use of $OUT"),
    ({"command": GOOD["command"].replace("$OUT", "$HOME")}, "unexpanded shell variable $HOME"),
    ({"command": GOOD["command"].replace("--iters 10", "--iterations 10")}, "rejects it: "),
    ({"command": GOOD["command"] + " --batchsize 4"}, "unrecognized arguments: --batchsize"),
    ({"command": GOOD["command"].replace("--format jpeg", "--format gif")}, "rejects it: "),
    ({"command": "python -m benchmarks.pipeline_bench --size 512"}, "does not start with `fewstep `"),
    ({"command": "fewstep bench nosuchtool --x"}, "no tool `fewstep bench nosuchtool`"),
    ({"batch": 8}, "row batch 8 not in --batch [16]"),
    ({"size": 1024}, "row size 1024 not in --size [512]"),
    ({"system": "diffusers-compile", "command": GOOD["command"].replace(" diffusers-compile", "")},
     "not among --baseline"),
    ({"command_status": "reconstructed from a guess", "command": GARBLED}, "command not runnable"),
    ({"command_recorded": GARBLED}, "command_recorded without a command_status"),
])
def test_validator_reports_bad_rows(change, expect):
    row = {k: v for k, v in GOOD.items() if not (k in change and change[k] is None)}
    row.update({k: v for k, v in change.items() if v is not None})
    errs = check_row(row)
    assert any(expect in e for e in errs), errs


def test_a_row_marked_unrunnable_is_accepted_but_not_one_with_stray_variables():
    marked = dict(GOOD, command="not kept", command_status="garbled in the original record; not recoverable",
                  command_recorded=GARBLED)
    assert check_row(marked) == []
    assert any("unexpanded" in e for e in check_row(dict(marked, command="fewstep bench pipeline --out $HOME/x")))


def test_validator_reports_bad_reports():
    rep = json.loads((RESULTS / "http" / "NVIDIA_H200" / "http_jpeg_c4.json").read_text())
    assert check_report(rep, "http") == []
    assert any("concurrency" in e for e in check_report(dict(rep, config=dict(rep["config"], concurrency=8)), "http"))
    assert any("gpu missing" in e for e in check_report({k: v for k, v in rep.items() if k != "gpu"}, "http"))
    bad_server = dict(rep, server=dict(rep["server"], command="bash x.sh $OUT/p$OUT/y"))
    assert any("server.command: garbled" in e for e in check_report(bad_server, "http"))
    stream = json.loads((RESULTS / "stream" / "NVIDIA_H200" / "stream_wan_s2.json").read_text())
    assert check_report(stream, "stream") == []
    assert any("--sessions" in e or "sessions" in e
               for e in check_report(dict(stream, command=stream["command"].replace("--sessions 2", "--sessions 3")),
                                     "stream"))
