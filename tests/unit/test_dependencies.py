"""Dependencies that are true: every third-party import of the shipped code is declared, and every floor in
pyproject.toml is the version that CI's minimum-versions run installs (constraints/minimum.txt)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("server", "engines", "kernels", "clients", "benchmarks", "training")
# import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "prometheus_client": "prometheus-client", "tensorrt_rtx": "tensorrt-rtx", "yaml": "pyyaml", "zmq": "pyzmq"}
# Imports that are optional at run time: each is inside a try/except ImportError (or behind a flag) and names what to
# install. torchvision: nvjpeg encoding where the GPU host's torch has it; tensorrt: full TensorRT where installed.
OPTIONAL = {"torchvision", "tensorrt"}
# torch's floor (2.11, the GPU image's) differs from CI's pin (2.13.0, the one CPU wheel on our machines): see
# constraints/minimum.txt.
PIN_EXCEPTIONS = {"torch"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared() -> dict[str, Requirement]:
    proj = _pyproject()["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in proj["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return {r.name.lower(): r for r in reqs}


def third_party_imports(folders=SHIPPED) -> dict[str, list[str]]:
    """Top-level module name -> files that import it, for every non-stdlib, non-fewstep import under folders."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for f in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("fewstep", "__future__"):
                        continue
                    found.setdefault(top, []).append(str(f.relative_to(ROOT)))
    return found


def undeclared(imports: dict[str, list[str]], decl: dict[str, Requirement]) -> dict[str, list[str]]:
    return {m: files for m, files in imports.items()
            if DIST.get(m, m).lower().replace("_", "-") not in decl and m not in OPTIONAL}


def test_every_shipped_import_is_declared():
    missing = undeclared(third_party_imports(), declared())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_import_audit_can_fail(tmp_path):
    imports = {"yaml": ["x.py"], "torch": ["y.py"]}
    decl = {"torch": Requirement("torch>=2.11")}
    assert undeclared(imports, decl) == {"yaml": ["x.py"]}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line).groups()
            pins[name.lower()] = version
    return pins


def floor_mismatches(decl: dict[str, Requirement], pins: dict[str, str]) -> list[str]:
    out = []
    for name, req in decl.items():
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if not floors:
            out.append(f"{name}: no floor in pyproject.toml")
        elif name not in pins:
            out.append(f"{name}: floor {floors[0]} is not in constraints/minimum.txt")
        elif name not in PIN_EXCEPTIONS and not _same(floors[0], pins[name]):
            out.append(f"{name}: floor {floors[0]} but CI's minimum run installs {pins[name]}")
    out += [f"{name}: pinned in constraints/minimum.txt but not a dependency" for name in pins if name not in decl]
    return out


def _same(a: str, b: str) -> bool:
    from packaging.version import Version

    return Version(a) == Version(b)


def test_floors_are_the_minimum_run_versions():
    assert not floor_mismatches(declared(), _pins())


def test_floor_check_can_fail():
    decl = {"fastapi": Requirement("fastapi>=0.100"), "numpy": Requirement("numpy")}
    assert floor_mismatches(decl, {"fastapi": "0.137.0", "httpx": "0.28.1"}) == [
        "fastapi: floor 0.100 but CI's minimum run installs 0.137.0", "numpy: no floor in pyproject.toml",
        "httpx: pinned in constraints/minimum.txt but not a dependency"]


def test_no_upper_bounds_without_a_reason():
    """An upper bound needs a measured break and its reason on the same line of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    for line in text.splitlines():
        if re.search(r'"[A-Za-z0-9_.-]+[^"]*(<|<=|~=|==)[0-9]', line) and "#" not in line:
            raise AssertionError(f"upper bound or pin without a reason: {line.strip()}")
