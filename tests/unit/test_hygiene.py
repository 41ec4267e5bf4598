"""The product's text says what the software does and when things were measured, never how the work was organised.

Results and notes name dates, commits, versions and GPUs ("the 2026-11-30 student (5f31bb2)"), not work sessions,
ticket numbers or the people and tools behind the work. This test scans every tracked text file and every shipped
``model_index.json`` for such wording. "Session" is also a product word here (stream sessions, WebSocket sessions,
``max_sessions``, pytest's session fixtures): the patterns only match it after an ordinal or a relative word, or
before a bare number, which stream wording does not use.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
             "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|\\d+(?:st|nd|rd|th)")
PROCESS = re.compile(
    r"\b(?:" + _ORDINALS + r"|this|next|previous|earlier|later|prior|last)"
    r"[- ](?:(?:device|performance|training|work)[- ])?sessions?\b"       # an ordinal or relative word before it
    r"|(?<![-_\w])sessions? #?\d+\b(?! *[x×*/+-])"                       # the word then a bare number (not "--sessions 8", "1 x 4")
    r"|\bissues? #?\d+\b"                                                # "issue 3"
    r"|\b(?:the|this|our|that) issue(?:'s)?\b"                          # "the issue asks"
    r"|\bclosing note\b|\bthis turn\b"
    r"|\bdevice[- ](?:minutes?|calls?|tool|budget)\b"
    r"|\bCEO\b",  # upper case only: scan() drops a lower-case "ceo"
    re.IGNORECASE,
)

SKIP_DIRS = {".git", ".venv", "venv", "env", "node_modules", "__pycache__", ".pytest_cache", ".mypy_cache",
             ".ruff_cache", "build", "dist", ".eggs", "out", ".whl"}
# This file holds the patterns and the examples that prove they fire, so it is the one file not scanned.
SELF = Path(__file__).resolve()


def tracked_files(root: Path = ROOT) -> list[Path]:
    """Files git tracks; without git (or outside a checkout), every file under root except VCS folders, caches,
    virtual environments and build outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        names = [n for n in out.stdout.decode("utf-8", "surrogateescape").split("\0") if n]
        if names:
            return [root / n for n in names]
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(dirpath) / f for f in filenames]
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None for binaries (anything that is not UTF-8) and unreadable paths."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def scan(paths, root: Path = ROOT) -> list[str]:
    """'file:line: text' for every line of the given files that describes how the work was organised."""
    hits = []
    for path in paths:
        if Path(path).resolve() == SELF:
            continue
        text = read_text(Path(path))
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            for m in PROCESS.finditer(line):
                if m.group(0).lower() == "ceo" and m.group(0) != "CEO":
                    continue
                try:
                    name = Path(path).resolve().relative_to(root)
                except ValueError:
                    name = Path(path)
                hits.append(f"{name}:{i}: {line.strip()[:200]}")
                break
    return hits


def shipped_model_indexes(root: Path = ROOT) -> list[Path]:
    return sorted((root / "engines" / "default").glob("*/model_index.json"))


def test_no_process_wording_in_tracked_files():
    files = set(tracked_files()) | set(shipped_model_indexes())
    hits = scan(sorted(files))
    assert not hits, ("text that describes how the work was organised (name dates, commits, versions instead):\n"
                      + "\n".join(hits))


def test_shipped_model_indexes_are_found():
    assert len(shipped_model_indexes()) >= 2  # image and video; scanned even where git does not track them


# The injected wording is assembled from parts, so that this file's own text stays clean of it.
_WORK = "sess" + "ion"
_TRAINED = f"The student was trained in the tenth {_WORK}"


def test_scanner_reports_process_wording(tmp_path):
    bad = tmp_path / "notes.md"
    bad.write_text(f"# Notes\n\n{_TRAINED}.\nSee {'iss' + 'ue'} 3.\nfine line\n"
                   f"The next device {_WORK} runs the HTTP bench.\n")
    hits = scan([bad], root=tmp_path)
    assert [h.split(":")[1] for h in hits] == ["3", "4", "6"], hits
    assert hits[0].startswith(f"notes.md:3: {_TRAINED}")


def test_scanner_ignores_stream_session_wording(tmp_path):
    ok = tmp_path / "stream.py"
    ok.write_text('"""Each stream session keeps its buffer."""\n'
                  "# a session's first chunk is 1 + 4 x 2 frames; the session's decoder cache carries over\n"
                  "max_sessions = 32  # open sessions; a session runs at most once per round\n"
                  "cmd = 'fewstep bench stream URL --sessions 8 --frames 300'\n"
                  "@pytest.fixture(scope='session')\n"
                  "# WebSocket sessions share forward passes; 1 session x 300 frames\n")
    assert scan([ok], root=tmp_path) == []


def test_scanner_skips_binary_files(tmp_path):
    blob = tmp_path / "grid.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\0\0 " + f"the tenth {_WORK}".encode() + b" \xff\xfe")
    assert scan([blob], root=tmp_path) == []
