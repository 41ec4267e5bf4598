"""The `tensorrt` backend: ONNX export -> TensorRT engines (cached on disk) -> stand-ins inside FewStepPipeline.

Flavours: the full TensorRT Python API (``import tensorrt``) is preferred; TensorRT-RTX (``import tensorrt_rtx``)
is the fallback. They share the builder/runtime API; the differences handled here:

* Precision. Both are driven by the tensor types of the ONNX graph (strongly typed networks): we export each
  component in the precision asked for and set ``STRONGLY_TYPED``. TensorRT-RTX (and TensorRT >= 11) are always
  strongly typed and have no FP16/BF16 builder flags; only a TensorRT without the strongly typed flag (8.x) gets
  the old precision flags instead.
* Target. Full TensorRT builds for the GPU it runs on, so it needs one. TensorRT-RTX builds ahead of time on a
  CPU; by default for its default set of compute capabilities (8.0, 8.6, 8.9, 12.0 per its documentation), or for
  the ones named (``targets=["sm86"]``), or for the visible GPU. It has no target for compute capability 9.0/10.x:
  on an H100/H200 it refuses, and full TensorRT is the way there.
* CUDA graphs. TensorRT-RTX captures them itself (``IRuntimeConfig.cuda_graph_strategy``), because its JIT
  compiles shape-specialised kernels lazily, which a manual stream capture would freeze half-way. With full
  TensorRT we capture ``execute_async_v3`` per input shape with torch.cuda.graph, one execution context per
  shape, all sharing one activation buffer.

What has been run: export, parsing and engine building with TensorRT-RTX 1.7 on a CPU (tests/unit/engines/
test_tensorrt.py, in CI). What has NOT been run: ``TRTModule`` and the stand-ins on a GPU. TensorRT-RTX refuses
compute capability 9.0 (our H200) and full TensorRT cannot be installed on the CPU-only machines this was written
on. The runtime path follows the TensorRT Python API documentation (deserialize_cuda_engine,
set_input_shape/set_tensor_address by name, execute_async_v3 on torch's current stream) and the stand-ins are
exercised on the CPU with onnxruntime sessions in place of engines.

Engine cache: one entry per (checkpoint content hash, component, input shape ranges, precision, flavour, flavour
version, build target, export version). An entry is ``<component>-<key>.engine`` plus a JSON sidecar holding the
key fields and the engine's sha256; both are written to a temporary file and renamed into place, the sidecar
last. A load re-checks the sidecar's fields and the checksum; a missing, corrupted or stale entry is deleted,
logged with its reason, and rebuilt. It is never loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import onnx_export
from .onnx_export import ComponentSpec

log = logging.getLogger("fewstep.engines")

CACHE_FORMAT = 1  # bump when the entry layout or the key fields change
DEFAULT_CACHE_DIR = Path("~/.cache/fewstep/engines")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Builder invocations in this process, per component; tests use it to prove a cache hit built nothing.
BUILDS: Counter[str] = Counter()


INSTALL_HINT = 'pip install "fewstep[tensorrt]"'
# Logged as a WARNING whenever a server starts on this backend (server/state.py): what our tests have and have not run.
RUNTIME_STATUS = ("the TensorRT engine's runtime path (TRTModule and the engine stand-ins) has not run on a GPU in our "
                  "tests: full TensorRT is not installable on our machines, and TensorRT-RTX refuses compute "
                  "capability 9.0 (H100/H200). Verified: the engine build on a CPU with TensorRT-RTX (CI builds real "
                  "engines), ONNX parity with the eager pipeline under onnxruntime, and the engine cache (hits, "
                  "invalidation, corrupted and stale entries)")


class TensorRTUnavailable(RuntimeError):
    """Neither TensorRT flavour can be used here; the message says why and what to install."""


def require_export_deps() -> None:
    """The ONNX exporter (torch.onnx, dynamo=True) needs onnx and onnxscript, which only the extra installs: say so
    instead of letting torch.onnx raise a bare ModuleNotFoundError half-way through a build."""
    import importlib

    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise TensorRTUnavailable(f"building TensorRT engines exports ONNX first, which needs {' and '.join(missing)} "
                                  f"(not installed); install the extra: {INSTALL_HINT}")


# -- flavour -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flavour:
    trt: Any      # the imported module
    name: str     # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


_FLAVOURS: dict[str | None, Flavour] = {}


def import_tensorrt(prefer: str | None = None) -> Flavour:
    """``tensorrt``, else ``tensorrt_rtx`` (or only ``prefer``). Imported lazily: the package never needs it."""
    if prefer in _FLAVOURS:
        return _FLAVOURS[prefer]
    names = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in names:
        try:
            mod = __import__(name)
        except (ImportError, OSError) as e:  # not installed, or installed without its libnvinfer (OSError)
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        _FLAVOURS[prefer] = Flavour(mod, name, str(getattr(mod, "__version__", "unknown")))
        return _FLAVOURS[prefer]
    raise TensorRTUnavailable("no TensorRT Python API importable (" + "; ".join(errors) + "). Install the extra: "
                              f"{INSTALL_HINT} (TensorRT-RTX), or NVIDIA's `tensorrt` wheel")


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dt not in table:
        raise TypeError(f"TensorRT dtype {dt} has no torch equivalent here")
    return table[dt]


def precision_of(dt: torch.dtype) -> str:
    return next(k for k, v in PRECISIONS.items() if v == dt)


# -- build target --------------------------------------------------------------------------------------------------
def build_target(fl: Flavour, targets: list[str] | None = None) -> tuple[str, list]:
    """(label for the cache key, TensorRT-RTX ComputeCapability values to set; [] = the builder's default)."""
    trt = fl.trt
    if not fl.rtx:
        if targets:
            raise ValueError("--target applies to TensorRT-RTX only; full TensorRT builds for the GPU it runs on")
        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"full TensorRT {fl.version} builds engines on the GPU that will run them, "
                                      "and torch sees no CUDA device (TensorRT-RTX can build on a CPU)")
        major, minor = torch.cuda.get_device_capability()
        return f"sm{major}{minor}", []
    members = dict(trt.ComputeCapability.__members__)
    if not targets and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        targets = [f"sm{major}{minor}"]
    if not targets:
        return "rtx-default", []
    chosen = []
    for t in targets:
        name = t.strip().upper().replace(".", "")
        name = name if name.startswith("SM") else f"SM{name}"
        if name not in members or name in ("NONE", "CURRENT"):
            supported = ", ".join(m.lower() for m in members if m.startswith("SM"))
            raise TensorRTUnavailable(f"TensorRT-RTX {fl.version} cannot build for {t} (it targets {supported}); "
                                      "compute capability 9.0 (H100/H200) and 10.x need full TensorRT")
        chosen.append(members[name])
    return ",".join(sorted(c.name.lower() for c in chosen)), chosen


# -- profiles ------------------------------------------------------------------------------------------------------
Range = tuple[int, int, int]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) images per batch, and image height and width in pixels."""

    batch: Range = (1, 1, 8)
    height: Range = (512, 512, 512)
    width: Range = (512, 512, 512)

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name}={lo}:{opt}:{hi}: need 1 <= min <= opt <= max")

    @classmethod
    def parse(cls, text: str) -> Profile:
        """'batch=1:4:16,size=512:512:1024' (size sets height and width; a single number N means N:N:N)."""
        fields: dict[str, Range] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            try:
                nums = tuple(int(v) for v in value.split(":"))
            except ValueError:
                nums = ()
            if name not in ("batch", "size", "height", "width") or len(nums) not in (1, 3):
                raise ValueError(f"bad profile part {part!r}: expected batch|size|height|width=MIN:OPT:MAX")
            rng = nums * 3 if len(nums) == 1 else nums
            for key in (("height", "width") if name == "size" else (name,)):
                fields[key] = rng
        return cls(**fields)

    @classmethod
    def native(cls, pipe, max_batch: int) -> Profile:
        """Batch 1..max_batch at the model's native size: what a server with default settings will run."""
        s = pipe.default_size
        return cls((1, 1, max_batch), (s, s, s), (s, s, s))

    def __str__(self) -> str:
        return ",".join(f"{k}={':'.join(map(str, getattr(self, k)))}" for k in ("batch", "height", "width"))

    def check_size(self, height: int, width: int) -> None:
        """Refuse, before any work, a request the engines cannot run (their input shapes are fixed ranges)."""
        (hlo, _, hhi), (wlo, _, whi) = self.height, self.width
        if not (hlo <= height <= hhi and wlo <= width <= whi):
            raise ValueError(f"size {width}x{height} is outside this server's TensorRT engines (width {wlo}..{whi}, "
                             f"height {hlo}..{hhi} pixels); ask for a size in that range, or rebuild with "
                             f"`fewstep build --profile size=MIN:OPT:MAX` and restart")


    def shapes(self, spec: ComponentSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every input of ``spec`` under this profile."""
        step = spec.spatial_scale * spec.spatial_multiple
        for name in ("height", "width"):
            lo, opt, hi = getattr(self, name)
            bad = [v for v in (lo, opt, hi) if v % step]
            if bad:
                raise ValueError(f"profile {name} {bad[0]} is not a multiple of {step} pixels, which the "
                                 f"{spec.component} needs")
            if lo < 2 * step and spec.spatial_multiple > 1:
                raise ValueError(f"profile {name} min {lo}: the {spec.component} engine needs at least {2 * step} "
                                 "pixels (two of its spatial steps)")
        b = self.batch
        axes = {"batch": (b[0], b[1], b[2] * spec.batch_factor),
                "height": tuple(v // spec.spatial_scale for v in self.height),
                "width": tuple(v // spec.spatial_scale for v in self.width)}
        return {t.name: tuple(tuple(axes[d][i] if isinstance(d, str) else d for d in t.dims) for i in range(3))
                for t in spec.inputs}

def check_batching(profile: Profile, max_batch_size: int) -> None:
    """Refuse at start-up a batching setting the engines cannot serve."""
    lo, _, hi = profile.batch
    if lo > 1:
        raise ValueError(f"TensorRT profile batch min is {lo}: a lone request is a batch of 1, so it must be 1")
    if hi < max_batch_size:
        raise ValueError(f"TensorRT profile batch max {hi} < --max-batch-size {max_batch_size}: rebuild with "
                         f"batch=1:OPT:{max_batch_size} or lower --max-batch-size")


class TensorRTRunner:
    """The TensorRT ``Runner`` (engines/runner.py): an eager pipeline whose modules are engine stand-ins
    (``install``), serving only its engines' profile. Out-of-profile sizes and batches are refused at validation
    (a 400 up front, not a failed batch). Built by ``enable``; tests build one around any pipeline."""

    def __init__(self, pipe, profile: Profile, max_batch_size: int, builds: list[BuildResult] | None = None,
                 build_seconds: float = 0.0):
        check_batching(profile, max_batch_size)
        self.pipe, self.profile, self.builds = pipe, profile, builds or []
        self.device = pipe.device
        self.compile_seconds = build_seconds

    @property
    def capabilities(self):
        # a request runs as one batch: EngineCore.validate refuses n above the engines' batch max up front
        # image-to-image is not offered: the engines stand in for the VAE's decoder only, not its encoder; the engines
        # replace the denoiser module, whose NASA processors and adapters are not exported
        modes = tuple(m for m in self.pipe.capabilities.guidance_modes if m not in ("nasa", "agd"))
        return dataclasses.replace(self.pipe.capabilities, backend="tensorrt",
                                   max_images_per_batch=self.profile.batch[2], img2img=False, guidance_modes=modes)

    def check_size(self, height: int, width: int) -> None:
        self.pipe.check_size(height, width)  # the model's own rule first
        self.profile.check_size(height, width)

    def batch_plan(self, n: int, height: int, width: int, steps: int) -> list[int]:
        return [n]  # any batch in the profile runs as one: the engines take dynamic batch sizes

    def uses_cfg(self, guidance_scale: float) -> bool:
        return self.pipe.uses_cfg(guidance_scale)

    def encode_prompt(self, prompts: list[str]):
        return self.pipe.encode_prompt(prompts)

    def negative_embeds(self, negative_prompts: list[str]):
        return self.pipe.negative_embeds(negative_prompts)

    def denoise(self, cond, generators, height, width, steps, guidance_scale, uncond=None, init=None,
                strength=1.0, nasa=None):
        if init is not None:
            raise ValueError("the TensorRT backend does not run image-to-image (capabilities.img2img is False)")
        if nasa is not None:
            raise ValueError("the TensorRT backend runs no NASA (guidance modes: "
                             f"{', '.join(self.capabilities.guidance_modes)})")
        return self.pipe.denoise(cond, generators, height, width, steps, guidance_scale, uncond)

    def img2img_schedule(self, steps, strength):
        return self.pipe.img2img_schedule(steps, strength)

    def img2img_steps(self, steps, strength):
        return self.pipe.img2img_steps(steps, strength)

    def img2img_default_steps(self, strength):
        return self.pipe.img2img_default_steps(strength)

    def decode(self, latents):
        return self.pipe.decode(latents)


# -- checkpoint hash, memoised on file stats -----------------------------------------------------------------------
_HASHES: dict[tuple[str, str], str] = {}


def _stat_signature(path: Path) -> str:
    # ctime changes on every content write and cannot be set back by tools that preserve mtime (cp -p, rsync -t).
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def checkpoint_content_hash(path: str | os.PathLike, memo_dir: Path | None = None) -> str:
    """``loading.checkpoint_hash``, re-read only when a file's name, size, mtime or ctime changed (in this process
    or, with memo_dir, since any earlier one): hashing a multi-GB checkpoint on every start costs seconds."""
    from ..loading import checkpoint_hash

    path = Path(path).resolve()
    sig = _stat_signature(path)
    if (str(path), sig) in _HASHES:
        return _HASHES[(str(path), sig)]
    memo_file = memo_dir / "checkpoint-hashes.json" if memo_dir else None
    memo: dict = {}
    if memo_file and memo_file.is_file():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_file.read_text())
    entry = memo.get(str(path), {})
    digest = entry.get("sha256") if entry.get("signature") == sig else None
    if digest is None:
        t0 = time.perf_counter()
        digest = checkpoint_hash(path)
        log.info("hashed checkpoint %s in %.1f s", path, time.perf_counter() - t0)
        if memo_file:
            memo[str(path)] = {"signature": sig, "sha256": digest}
            _atomic_write(memo_file, json.dumps(memo, indent=1).encode())
    _HASHES[(str(path), sig)] = digest
    return digest


# -- the engine cache ----------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache directory should stay readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # remove the temporary file on any exit (interrupts included), then re-raise
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def engine_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class EngineCache:
    """``<root>/<component>-<key[:32]>.engine`` + ``.json`` sidecar {key, fields, sha256, size, io, ...}."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or DEFAULT_CACHE_DIR).expanduser()

    def paths(self, component: str, key: str) -> tuple[Path, Path]:
        stem = self.root / f"{component}-{key[:32]}"
        return stem.with_suffix(".engine"), stem.with_suffix(".json")

    def timing_cache_path(self, fl: Flavour, target: str) -> Path:
        return self.root / "timing" / f"{fl.name}-{fl.version}-{target}.cache"

    def load(self, component: str, key: str, fields: dict[str, Any]) -> tuple[bytes | None, str]:
        """(engine bytes, "") when the entry is intact and current; else (None, why), the entry deleted."""
        engine_path, meta_path = self.paths(component, key)
        if not meta_path.is_file() and not engine_path.is_file():
            return None, "not cached"
        why = self._check(engine_path, meta_path, key, fields)
        if isinstance(why, bytes):
            return why, ""
        log.warning("engine cache: %s: %s; deleting it and rebuilding", engine_path, why)
        for p in (meta_path, engine_path):  # sidecar first: a half-deleted entry reads as absent, never as valid
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return None, why

    @staticmethod
    def _check(engine_path: Path, meta_path: Path, key: str, fields: dict[str, Any]) -> bytes | str:
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return "sidecar missing (interrupted write)"
        except (OSError, ValueError) as e:
            return f"sidecar unreadable ({e})"
        if meta.get("key") != key:
            return "sidecar belongs to another key"
        stale = sorted(k for k in set(fields) | set(meta.get("fields", {}))
                       if meta.get("fields", {}).get(k) != fields.get(k))
        if stale:
            k = stale[0]
            return f"stale sidecar: {k} is {meta.get('fields', {}).get(k)!r}, expected {fields.get(k)!r}"
        try:
            data = engine_path.read_bytes()
        except FileNotFoundError:
            return "engine file missing"
        if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return f"checksum mismatch ({len(data)} bytes, sidecar says {meta.get('size')}): corrupted"
        return data

    def store(self, component: str, key: str, fields: dict[str, Any], engine: bytes, **extra) -> Path:
        engine_path, meta_path = self.paths(component, key)
        meta = {"key": key, "fields": fields, "size": len(engine), "sha256": hashlib.sha256(engine).hexdigest(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        _atomic_write(engine_path, engine)
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())  # the sidecar commits the entry
        return engine_path

    @contextlib.contextmanager
    def lock(self, component: str, key: str) -> Iterator[None]:
        """Serialise builders of one entry across processes (two servers starting at once build once)."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; a duplicate build is wasted time, not corruption
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.paths(component, key)[0].with_suffix(".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# -- building ------------------------------------------------------------------------------------------------------
def _logger(fl: Flavour, errors: list[str]):
    trt = fl.trt
    S = trt.ILogger.Severity
    levels = {S.INTERNAL_ERROR: logging.ERROR, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING,
              S.INFO: logging.DEBUG, S.VERBOSE: 5}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                errors.append(msg)
            if log.isEnabledFor(level):
                log.log(level, "[%s] %s", fl.name, msg)

    return _Logger()


def _progress_monitor(fl: Flavour, label: str, emit: Callable[[str], None]):
    trt = fl.trt
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Progress(trt.IProgressMonitor):
        """Prints builder phases (three levels deep) as they start, and the top two as they finish."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, tuple[float, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.started[parent_phase][1] + 1 if parent_phase in self.started else 0
            self.started[phase_name] = (time.perf_counter(), depth)
            if depth <= 2:  # deeper phases repeat per layer: noise on a big model
                steps = f" ({num_steps} steps)" if num_steps > 1 else ""
                emit(f"{label}: {'  ' * depth}{phase_name}{steps}")

        def step_complete(self, phase_name, step):
            return True  # returning False would cancel the build

        def phase_finish(self, phase_name):
            t0, depth = self.started.pop(phase_name, (time.perf_counter(), 0))
            if depth <= 1:
                emit(f"{label}: {'  ' * depth}{phase_name} done in {time.perf_counter() - t0:.1f} s")

    return _Progress()


def build_engine(fl: Flavour, onnx_path: Path, shapes: dict[str, tuple], *, precision: str, targets: list,
                 timing_cache: Path | None = None, name: str = "network",
                 progress: Callable[[str], None] | None = None) -> tuple[bytes, list[dict]]:
    """Parse ``onnx_path`` and build one engine with one optimization profile. Returns (engine bytes, io table)."""
    trt = fl.trt
    errors: list[str] = []
    logger = _logger(fl, errors)
    builder = trt.Builder(logger)
    flags = 0
    nflags = trt.NetworkDefinitionCreationFlag.__members__
    # TensorRT 9-10 and TensorRT-RTX: opt in with the flag. TensorRT >= 11 is always strongly typed (no FP16 flag
    # left). Only TensorRT 8.x is weakly typed: explicit batch, and the precision set by builder flags below.
    strongly_typed = "STRONGLY_TYPED" in nflags or not hasattr(trt.BuilderFlag, "FP16")
    if "STRONGLY_TYPED" in nflags:
        flags |= 1 << int(nflags["STRONGLY_TYPED"])
    elif "EXPLICIT_BATCH" in nflags:
        flags |= 1 << int(nflags["EXPLICIT_BATCH"])
    network = builder.create_network(flags)
    network.name = name
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        msgs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{fl.name} could not parse {onnx_path.name}: " + "; ".join(msgs or errors))

    config = builder.create_builder_config()
    if not strongly_typed and precision != "fp32":
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise TensorRTUnavailable(f"{fl.name} {fl.version} has no {precision} support")
        config.set_flag(flag)
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            if not config.set_compute_capability(cc, i):
                raise RuntimeError(f"{fl.name} refused build target {cc}")

    profile = builder.create_optimization_profile()
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name not in shapes:
            raise RuntimeError(f"{onnx_path.name}: input {t.name!r} has no profile shape (spec: {sorted(shapes)})")
        lo, opt, hi = shapes[t.name]
        profile.set_shape(t.name, lo, opt, hi)
        io.append({"name": t.name, "mode": "input", "dtype": str(t.dtype).split(".")[-1], "dims": list(t.shape),
                   "min": list(lo), "opt": list(opt), "max": list(hi)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": str(t.dtype).split(".")[-1], "dims": list(t.shape)})
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None and fl.rtx and not torch.cuda.is_available():
        # A CPU-only TensorRT-RTX build times nothing (0 entries), and reading a saved cache back needs a CUDA
        # driver (it fails with cudaError 35). The cache is persisted when a GPU is present.
        log.debug("%s: no timing cache for a CPU-only TensorRT-RTX build", name)
        timing_cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        blob = b""
        if timing_cache.is_file():
            blob = timing_cache.read_bytes()
        try:
            cache = config.create_timing_cache(blob)
        # Deliberately broad: the bindings do not document what a corrupted timing cache raises, and an unreadable
        # cache must only cost a cold start, never the build.
        except Exception as e:  # noqa: BLE001
            log.warning("timing cache %s unreadable (%s); starting an empty one", timing_cache, e)
            cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):  # False: refuse a cache from another device/version
            log.warning("timing cache %s does not match this builder; starting an empty one", timing_cache)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    if progress is not None:
        monitor = _progress_monitor(fl, name, progress)
        if monitor is not None:
            config.progress_monitor = monitor

    BUILDS[name] += 1
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{fl.name} failed to build {name}: " + ("; ".join(errors) or "no error reported"))
    if cache is not None:
        _atomic_write(timing_cache, bytes(cache.serialize()))
    return bytes(serialized), io


@dataclass
class BuildResult:
    component: str
    path: Path
    hit: bool
    size: int
    key: str
    fields: dict[str, Any]
    export_s: float = 0.0
    build_s: float = 0.0
    reason: str = ""  # why it was (re)built: "not cached", "checksum mismatch ...", "stale sidecar: ..."

    def line(self) -> str:
        mib = self.size / 2**20
        if self.hit:
            return f"{self.component}: cache hit, {mib:.1f} MiB, {self.path}"
        return (f"{self.component}: built ({self.reason}) in {self.export_s + self.build_s:.1f} s (export "
                f"{self.export_s:.1f} s, build {self.build_s:.1f} s), {mib:.1f} MiB, {self.path}")


def build_engines(pipe, profile: Profile, *, components: list[str] | None = None,
                  cache_dir: str | os.PathLike | None = None, targets: list[str] | None = None,
                  flavour: str | None = None, progress: Callable[[str], None] | None = None,
                  onnx_dir: str | os.PathLike | None = None) -> list[BuildResult]:
    """Engines for ``pipe``'s components, each from the cache or exported and built. Each component is built in
    the precision its module has in ``pipe`` (an fp16 pipeline keeps an fp32 VAE where its config forces that).
    onnx_dir: keep the exported ONNX files there (``<component>.onnx`` + ``.data``); default: a temporary dir."""
    fl = import_tensorrt(flavour)
    target, ccs = build_target(fl, targets)
    cache = EngineCache(cache_dir)
    have = onnx_export.components(pipe)
    components = components or have
    missing = [c for c in components if c not in have]
    if missing:
        raise ValueError(f"{pipe.ckpt.path} has no {', '.join(missing)} (it has {', '.join(have)})")
    if getattr(pipe, "attention", "dense") != "dense":
        raise ValueError(f"attention={pipe.attention!r} has no TensorRT export; the engines use dense attention")
    ckpt_hash = checkpoint_content_hash(pipe.ckpt.path, cache.root)
    results = []
    for comp in components:
        _, spec = onnx_export.wrap(pipe, comp)
        shapes = profile.shapes(spec)
        fields = {"format": CACHE_FORMAT, "checkpoint_sha256": ckpt_hash, "component": comp,
                  "shapes": {k: " / ".join("x".join(map(str, s)) for s in v) for k, v in sorted(shapes.items())},
                  "precision": precision_of(spec.inputs[0].dtype if spec.inputs[0].dtype.is_floating_point
                                            else spec.outputs[0].dtype),
                  "flavour": fl.name, "flavour_version": fl.version, "target": target,
                  "export_version": onnx_export.EXPORT_VERSION, "opset": onnx_export.OPSET}
        key = engine_key(fields)
        with cache.lock(comp, key):
            data, why = cache.load(comp, key, fields)
            path = cache.paths(comp, key)[0]
            if data is not None:
                results.append(BuildResult(comp, path, True, len(data), key, fields))
                continue
            with contextlib.ExitStack() as stack:
                tmp = (Path(onnx_dir) if onnx_dir is not None
                       else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"fewstep-onnx-{comp}-"))))
                t0 = time.perf_counter()
                require_export_deps()  # only a cache miss exports: serving from built engines needs no onnx
                if progress:
                    progress(f"{comp}: exporting ONNX ({fields['precision']})")
                onnx_export.export(pipe, comp, tmp / f"{comp}.onnx")
                t1 = time.perf_counter()
                data, io = build_engine(fl, tmp / f"{comp}.onnx", shapes, precision=fields["precision"],
                                        targets=ccs, timing_cache=cache.timing_cache_path(fl, target),
                                        name=f"fewstep/{comp}", progress=progress)
                t2 = time.perf_counter()
            path = cache.store(comp, key, fields, data, io=io, build_seconds=round(t2 - t1, 3),
                               export_seconds=round(t1 - t0, 3), profile=str(profile))
            results.append(BuildResult(comp, path, False, len(data), key, fields, t1 - t0, t2 - t1, why))
    return results


def build(model_dir: str | os.PathLike, profile: Profile | None = None, precision: str = "fp16",
          max_batch: int = 8, **kw) -> list[BuildResult]:
    """Ahead-of-time build (``fewstep build``): load the checkpoint on the CPU in ``precision`` (export traces
    with fake tensors, so no GPU and no fp16 CPU kernels are needed) and build. profile None: Profile.native."""
    from ..loading import load_checkpoint
    from ..pipeline import FewStepPipeline

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dt = PRECISIONS[precision]
    pipe = FewStepPipeline(load_checkpoint(model_dir, "cpu", dt), "cpu", dt)
    return build_engines(pipe, profile or Profile.native(pipe, max_batch), **kw)


# -- runtime -------------------------------------------------------------------------------------------------------
class TRTModule:
    """One deserialized engine. ``module(**inputs) -> {output name: tensor}``: binds torch tensors by name and
    runs on torch's current CUDA stream. cuda_graph: TensorRT-RTX's built-in capture, or (full TensorRT) one
    captured graph per input-shape signature. Not run on a GPU yet (see the module docstring)."""

    def __init__(self, engine: bytes, *, device: torch.device | str = "cuda", cuda_graph: bool = False,
                 runtime_cache: Path | None = None, flavour: str | None = None, name: str = "engine"):
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("the TensorRT runtime needs a CUDA device; torch sees none")
        self.fl = fl = import_tensorrt(flavour)
        self.name = name
        self.device = torch.device(device)
        self._errors: list[str] = []
        self._logger = _logger(fl, self._errors)
        self.cuda_graph = cuda_graph
        self.runtime_cache_path = runtime_cache
        self._runtime_cache = None
        self._graphs: dict[tuple, tuple[Any, Any, dict, dict]] = {}
        self._graph_memory: torch.Tensor | None = None
        with torch.cuda.device(self.device):  # engine, contexts and their memory live on the pipeline's GPU
            self._open(engine)

    def _open(self, engine: bytes) -> None:
        trt, name = self.fl.trt, self.name
        self.runtime = trt.Runtime(self._logger)
        if hasattr(self.runtime, "get_engine_validity"):  # TensorRT-RTX: why an engine cannot run here, up front
            validity, diag = self.runtime.get_engine_validity(engine)
            if validity == trt.EngineValidity.INVALID:
                raise RuntimeError(f"{name}: engine invalid on this GPU (diagnostics {diag:#x}: version, compute "
                                   "capability, driver or memory); delete it from the cache to rebuild")
            if validity == trt.EngineValidity.SUBOPTIMAL:
                log.warning("%s: engine runs here but suboptimally (diagnostics %#x)", name, diag)
        self.engine = self.runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            raise RuntimeError(f"{name}: deserialization failed: " + "; ".join(self._errors))
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.inputs = {n: _torch_dtype(trt, e.get_tensor_dtype(n)) for n in names
                       if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.outputs = {n: _torch_dtype(trt, e.get_tensor_dtype(n)) for n in names
                        if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
        self.profile = {n: tuple(tuple(s) for s in e.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        runtime_cache = self.runtime_cache_path
        if self.fl.rtx:
            rc = e.create_runtime_config()
            if runtime_cache is not None:
                self._runtime_cache = rc.create_runtime_cache()
                # The runtime validates the blob (version, GPU, driver) and refuses a mismatch: then we start cold.
                if runtime_cache.is_file() and not self._runtime_cache.deserialize(runtime_cache.read_bytes()):
                    log.warning("%s: runtime cache %s does not fit this GPU/driver/version; starting cold", name,
                                runtime_cache)
                rc.set_runtime_cache(self._runtime_cache)
            if self.cuda_graph:
                rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = e.create_execution_context(rc)
        else:
            self.context = e.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{name}: could not create an execution context: " + "; ".join(self._errors))

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for n, shape in shapes.items():
            lo, _, hi = self.profile[n]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                raise ValueError(f"{self.name}: input {n} shape {tuple(shape)} is outside the engine's profile "
                                 f"{lo}..{hi}; rebuild with a wider --profile")

    def _bind(self, context, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, t in feeds.items():
            if not context.set_input_shape(n, tuple(t.shape)):
                raise RuntimeError(f"{self.name}: set_input_shape({n}, {tuple(t.shape)}) refused")
            context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n, dt in self.outputs.items():
            shape = tuple(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name}: output {n} shape {shape} unresolved; inputs missing?")
            outs[n] = torch.empty(shape, dtype=dt, device=self.device)
            context.set_tensor_address(n, outs[n].data_ptr())
        return outs

    def _feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}")
        feeds = {n: inputs[n].to(self.device, dt).contiguous() for n, dt in self.inputs.items()}
        self.check_shapes({n: tuple(t.shape) for n, t in feeds.items()})
        return feeds

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = self._feeds(inputs)
        if self.cuda_graph and not self.fl.rtx:
            return self._replay(feeds)
        outs = self._bind(self.context, feeds)
        stream = torch.cuda.current_stream(self.device)
        # The feeds stay referenced until this returns, and later torch work is ordered on the same stream, so the
        # caching allocator cannot hand their memory to anyone before the engine has read it.
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed: " + "; ".join(self._errors[-3:]))
        return outs

    def _replay(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full TensorRT + CUDA graphs: one context and one captured graph per input-shape signature; contexts
        share one activation buffer (they never run concurrently: all work is on one stream)."""
        trt = self.fl.trt
        sig = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if sig not in self._graphs:
            if self._graph_memory is None:  # the largest need over all profiles and shapes
                size = (self.engine.device_memory_size_v2 if hasattr(self.engine, "device_memory_size_v2")
                        else self.engine.device_memory_size)
                self._graph_memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
                ctx.set_device_memory(self._graph_memory.data_ptr(), self._graph_memory.numel())
            else:
                ctx.device_memory = self._graph_memory.data_ptr()
            static_in = {n: t.clone() for n, t in feeds.items()}
            static_out = self._bind(ctx, static_in)
            stream = torch.cuda.current_stream(self.device)
            # One plain run first: TensorRT does shape-dependent setup on the first enqueue after a shape change,
            # which must not land inside the capture.
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed before capture")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                    raise RuntimeError(f"{self.name}: execute_async_v3 failed during capture")
            self._graphs[sig] = (graph, ctx, static_in, static_out)
        graph, _, static_in, static_out = self._graphs[sig]
        for n, t in feeds.items():
            static_in[n].copy_(t)
        graph.replay()
        return {n: o.clone() for n, o in static_out.items()}  # the next replay overwrites static_out

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: persist the JIT-compiled kernels so the next start skips compiling them."""
        if self._runtime_cache is not None and self.runtime_cache_path is not None:
            _atomic_write(self.runtime_cache_path, bytes(self._runtime_cache.serialize()))


# -- stand-ins: what FewStepPipeline calls -------------------------------------------------------------------------
class _StandIn(nn.Module):
    """An engine in a torch module's place. Holds one empty parameter so that ``next(m.parameters()).dtype``
    (FewStepPipeline.decode asks the VAE that way) answers the engine's dtype; forwards ``config``."""

    def __init__(self, engine, original: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.engine = engine
        self.config = original.config
        self._dtype_anchor = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_anchor.dtype


class _HiddenStates(tuple):
    pass


class _EncoderOutput(tuple):
    """``out[0]`` and ``out.hidden_states[-2]``: the two things FewStepPipeline reads from an SDXL encoder."""

    hidden_states: tuple


class TRTTextEncoder(_StandIn):
    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **_):
        feeds = {"input_ids": input_ids}
        if "attention_mask" in self.engine.inputs:
            feeds["attention_mask"] = attention_mask
        out = self.engine(**feeds)
        if "pooled" in out:  # SDXL layout: hidden_states is the penultimate layer
            res = _EncoderOutput((out["pooled"],))
            res.hidden_states = _HiddenStates((out["hidden_states"], None))  # only [-2] is defined
            return res
        return (out["hidden_states"],)


class TRTDenoiser(_StandIn):
    def __init__(self, engine, original: nn.Module, dtype: torch.dtype):
        super().__init__(engine, original, dtype)
        self.use_additional_conditions = bool(getattr(original, "use_additional_conditions", False))

    def forward(self, sample, timestep=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep_cond=None, added_cond_kwargs=None, return_dict=True, **_):
        names = self.engine.inputs
        # UNet names its first input `sample`, PixArt `hidden_states`; the engine says which it is.
        feeds = {"sample" if "sample" in names else "hidden_states": sample, "timestep": timestep,
                 "encoder_hidden_states": encoder_hidden_states}
        if "encoder_attention_mask" in names:
            feeds["encoder_attention_mask"] = encoder_attention_mask
        if "timestep_cond" in names:
            feeds["timestep_cond"] = timestep_cond
        for k in ("text_embeds", "time_ids", "resolution", "aspect_ratio"):
            if k in names:
                feeds[k] = (added_cond_kwargs or {})[k]
        return (self.engine(**feeds)["out"],)


class TRTVAEDecoder(_StandIn):
    def decode(self, z, return_dict=True, **_):
        return (self.engine(latent=z)["image"],)


_STANDINS = {"text_encoder": TRTTextEncoder, "text_encoder_2": TRTTextEncoder, "denoiser": TRTDenoiser,
             "vae": TRTVAEDecoder}


def install(pipe, engines: dict[str, Any]) -> None:
    """Put ``engines`` (component -> a module with ``inputs`` {name: dtype} and ``__call__(**inputs) -> dict``)
    in place of the pipeline's torch modules. ``pipe._model``, ``encode_tokens`` and ``decode`` run unchanged."""
    attr = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "denoiser": "denoiser", "vae": "vae"}
    for comp, engine in engines.items():
        original = getattr(pipe, attr[comp])
        dtype = next(original.parameters()).dtype
        cls = _STANDINS[comp]
        if comp.startswith("text_encoder"):
            # tokenize() picks the T5 padding length from the encoder's class name; keep the name visible.
            cls = type(f"TRT{type(original).__name__}", (cls,), {})
        standin = cls(engine, original, dtype)
        setattr(pipe, attr[comp], standin)
        ckpt_name = pipe.denoiser_name if comp == "denoiser" else comp
        if pipe.ckpt.components.get(ckpt_name) is original:
            pipe.ckpt.components[ckpt_name] = standin  # drop the torch weights' last reference
        if comp == "denoiser":
            pipe.nasa = None  # the engine has no attention processors: no NASA (guidance modes drop "nasa")


def enable(pipe, engine_cfg, progress: Callable[[str], None] | None = None) -> TensorRTRunner:
    """Serve ``pipe`` from TensorRT engines: build (or load) every component's engine under
    ``engine_cfg.tensorrt`` (EngineConfig), install them, and return the runner (its ``builds`` say what was built
    or loaded). Needs a CUDA pipeline."""
    opts = engine_cfg.tensorrt
    if pipe.device.type != "cuda":
        raise ValueError("backend 'tensorrt' needs device cuda (the engines run on the GPU)")
    if getattr(pipe, "adapters", None) is not None:
        # the exported denoiser would run without its per-request adapter scale: refuse rather than serve plain
        raise ValueError("guidance adapters (--adapters) are not exported to TensorRT; use the eager or compiled "
                         "backend")
    profile = (Profile.parse(opts.profile) if opts.profile
               else Profile.native(pipe, engine_cfg.batching.max_batch_size))
    check_batching(profile, engine_cfg.batching.max_batch_size)  # before the (long) build: fail fast
    t0 = time.perf_counter()
    results = build_engines(pipe, profile, cache_dir=opts.cache_dir, targets=opts.targets or None,
                            progress=progress or (lambda s: log.info("tensorrt: %s", s)))
    cache = EngineCache(opts.cache_dir)
    engines = {}
    for r in results:
        data, why = cache.load(r.component, r.key, r.fields)  # verified again: these exact bytes get deserialized
        if data is None:
            raise RuntimeError(f"{r.path} changed between build and load ({why}); start again")
        engines[r.component] = TRTModule(data, device=pipe.device, cuda_graph=opts.cuda_graph,
                                         runtime_cache=r.path.with_suffix(".runtime-cache"), name=r.component)
        # TensorRT-RTX compiles kernels on first use (warm-up and early traffic); keep them for the next start.
        atexit.register(engines[r.component].save_runtime_cache)
    install(pipe, engines)
    torch.cuda.empty_cache()
    return TensorRTRunner(pipe, profile, engine_cfg.batching.max_batch_size, results, time.perf_counter() - t0)


def describe() -> str:
    """One line for logs and test skips: which flavour would be used, or why none can."""
    try:
        fl = import_tensorrt()
    except TensorRTUnavailable as e:
        return str(e)
    return f"{fl.name} {fl.version}"

