"""Shared helpers for the training stages: devices, time budgets, logging, safetensors checkpoints.

Checkpoints are never pickled. A checkpoint of stage ``NAME`` is a folder ``DIR/NAME_ckpt/`` with
``state.json`` (step, seed, RNG state, configs, the shard list) and one or more
``NAME_ckpt-g<gen>-<i>.safetensors`` shards, each at most :data:`SHARD_BYTES` (< 16 MB, so each
file can travel back from a GPU call on its own). ``state.json`` is written last and atomically
(tmp + rename); it is the commit point, so a crash mid-save leaves the previous checkpoint valid.

To keep a whole checkpoint small enough to travel (the GPU machine returns at most 64 MB per call),
tensors are stored in 16 bits: model weights and EMA weights in fp16 (the precision of the shipped
export), Adam moments in bf16 (their range needs bf16's exponent). Training itself is fp32 master
weights + bf16 autocast; resuming re-expands to fp32, which costs one rounding of the live
weights (below the size of a single optimizer update at the learning rates used here).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROCESS_START = time.time()

#: maximum bytes of one checkpoint shard (the GPU machine returns files < 16 MB).
SHARD_BYTES = 15_000_000


# ----------------------------------------------------------------------------------------------
# Devices, seeds, budget
# ----------------------------------------------------------------------------------------------

def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_torch(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, salt); used to seed per-step generators so that any
    step's randomness is a pure function of (seed, step) and resuming needs only the step."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


class UsageError(ValueError):
    """A stage's options do not fit its inputs: ``fewstep train`` prints the message, not a traceback."""


class Budget:
    """Wall-clock budget of one stage, from ``start`` (default: the import of this module)."""

    def __init__(self, minutes: float, start: float | None = None):
        self.seconds = float(minutes) * 60.0
        self.start = PROCESS_START if start is None else start

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def fmt_secs(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60:d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------

class JsonlLog:
    """Append-only JSON-lines log (one object per line, flushed on every write)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, **rec: Any) -> None:
        rec.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(rec, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class Stage:
    """What every training stage starts with (wall-clock budget, device, output folder, loss log, seed) and ends
    with (the export line in the log)."""

    def __init__(self, args, log_name: str):
        self.budget = Budget(args.minutes, args.budget_start)
        self.device = pick_device(args.device)
        setup_torch(self.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonlLog(self.out / log_name)
        torch.manual_seed(args.seed)

    def exported(self, tag: str, what: str, exp: Path, step: int) -> Path:
        from fewstep.training.export import summarize

        log(f"[{tag}] exported {what}: {summarize(exp)}")
        self.jsonl.write(event="exported", path=str(exp), step=step)
        self.jsonl.close()
        return exp


def _json_default(o: Any):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def log(msg: str) -> None:
    """Print a progress line that does not fight with tqdm bars."""
    try:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
    except Exception:  # pragma: no cover
        print(msg, flush=True)
    sys.stdout.flush()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Checkpoints (sharded safetensors + state.json)
# ----------------------------------------------------------------------------------------------

def ckpt_dir(out: str | Path, name: str) -> Path:
    return Path(out) / f"{name}_ckpt"


def save_checkpoint(out: str | Path, name: str, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write ``tensors`` as shards (each <= SHARD_BYTES) + ``state.json``; atomic; returns the dir."""
    from safetensors.torch import save_file

    d = ckpt_dir(out, name)
    d.mkdir(parents=True, exist_ok=True)
    prev = read_json(d / "state.json") if (d / "state.json").exists() else None
    gen = int(prev["generation"]) + 1 if prev else 0
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(cpu):
        nbytes = cpu[k].numel() * cpu[k].element_size()
        if nbytes > SHARD_BYTES:
            raise ValueError(f"tensor {k} ({nbytes} bytes) exceeds one shard")
        if size + nbytes > SHARD_BYTES - 64 * 1024 and shards[-1]:  # headroom for the header
            shards.append({})
            size = 0
        shards[-1][k] = cpu[k]
        size += nbytes
    names = []
    for i, sh in enumerate(shards):
        fname = f"{name}_ckpt-g{gen:04d}-{i:02d}.safetensors"
        tmp = d / (fname + ".tmp")
        save_file(sh, str(tmp), metadata={"format": "pt", "stage": name, "generation": str(gen)})
        os.replace(tmp, d / fname)
        names.append(fname)
    state = dict(state, generation=gen, shards=names, saved_at=time.time())
    write_json(d / "state.json", state)
    # the new state.json is committed: drop older shards
    for f in d.glob(f"{name}_ckpt-g*.safetensors"):
        if f.name not in names:
            f.unlink(missing_ok=True)
    return d


def load_checkpoint(out: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    d = ckpt_dir(out, name)
    if not (d / "state.json").exists():
        return None
    state = read_json(d / "state.json")
    tensors: dict[str, torch.Tensor] = {}
    for fname in state["shards"]:
        tensors.update(load_file(str(d / fname)))
    return tensors, state


def pack_training_state(model: torch.nn.Module, ema: torch.nn.Module,
                        opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten model / EMA / AdamW moments into a name -> tensor dict (16-bit, see module doc)."""
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        out[f"model.{n}"] = p.detach().to(torch.float16)
    for n, p in ema.named_parameters():
        out[f"ema.{n}"] = p.detach().to(torch.float16)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        n = names.get(id(p))
        if n is None:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"opt.{key}.{n}"] = st[key].detach().to(torch.bfloat16)
        if "step" in st:
            out[f"opt.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def unpack_training_state(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                          ema: torch.nn.Module, opt: torch.optim.Optimizer | None) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"model.{n}"].to(p.dtype))
        for n, p in ema.named_parameters():
            p.copy_(tensors[f"ema.{n}"].to(p.dtype))
    if opt is None:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            n = next((nn for nn, pp in model.named_parameters() if pp is p), None)
            if n is None or f"opt.exp_avg.{n}" not in tensors:
                continue
            st = opt.state[p]
            st["exp_avg"] = tensors[f"opt.exp_avg.{n}"].to(device=p.device, dtype=p.dtype).clone()
            st["exp_avg_sq"] = tensors[f"opt.exp_avg_sq.{n}"].to(device=p.device, dtype=p.dtype).clone()
            step = float(tensors[f"opt.step.{n}"].item())
            # fused/capturable AdamW keep `step` as a tensor on the param's device, the others on CPU
            if group.get("fused") or group.get("capturable"):
                st["step"] = torch.tensor(step, dtype=torch.float32, device=p.device)
            else:
                st["step"] = torch.tensor(step, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------

def bf16_autocast(enabled: bool):
    """The training stages' mixed precision: bf16 autocast on CUDA when ``enabled``, else a no-op context."""
    import contextlib
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
               betas=(0.9, 0.99), capturable: bool = False) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    if capturable and device.type == "cuda":   # see training.graphs: the LR and step count live on the GPU
        kw.update(capturable=True)
        lr = torch.tensor(lr, device=device)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kw)


def wsd_lr(step: int, base: float, warmup: int, total: int | None, cooldown_frac: float,
           floor: float = 0.1) -> float:
    """Warmup-stable-decay: linear warmup, constant, linear decay to ``floor*base`` over the last
    ``cooldown_frac`` of ``total`` steps (no decay while ``total`` is unknown)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if total is None or cooldown_frac <= 0:
        return base
    start = total * (1.0 - cooldown_frac)
    if step <= start:
        return base
    frac = min(1.0, (step - start) / max(1.0, total - start))
    return base * (1.0 - (1.0 - floor) * frac)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: short horizons early so the EMA is useful from the first checkpoint."""
    return min(decay, (1.0 + step) / (10.0 + step))


def maybe_compile(fn, enabled: bool, device: torch.device, what: str):
    """torch.compile ``fn`` when asked and on CUDA; the caller must be ready for the first call to
    fail (see :class:`GuardedCompiled`)."""
    if not enabled or device.type != "cuda":
        return fn
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the platform
        log(f"[compile] {what}: torch.compile unavailable ({type(e).__name__}: {e}); eager")
        return fn


class GuardedCompiled:
    """Calls the compiled function; on any exception during the first ``probe`` calls, falls back
    to the eager function for good (logged). Later exceptions propagate."""

    def __init__(self, eager, compiled, what: str, probe: int = 3, on_fail=None):
        self.eager, self.compiled, self.what, self.probe = eager, compiled, what, probe
        self.on_fail = on_fail
        self.calls = 0
        self.using_compiled = compiled is not eager

    def __call__(self, *a, **kw):
        if not self.using_compiled:
            return self.eager(*a, **kw)
        try:
            out = self.compiled(*a, **kw)
            self.calls += 1
            return out
        except Exception as e:
            if self.calls >= self.probe:
                raise
            log(f"[compile] {self.what}: compiled call failed ({type(e).__name__}: {str(e)[:300]}); "
                "falling back to eager")
            self.using_compiled = False
            if self.on_fail is not None:
                self.on_fail()
            return self.eager(*a, **kw)


def guarded_train_step(loss_fn, call, enabled: bool, device: torch.device, what: str, on_fail=None):
    """A training step ``step(*batch)`` that runs ``call(loss, *batch)`` with ``loss`` the compiled (when enabled
    and it works) or eager ``loss_fn``, then back-propagates the loss (the result, or its first element)."""
    compiled = maybe_compile(loss_fn, enabled, device, what)

    def make(fn):
        def step(*batch):
            out = call(fn, *batch)
            (out[0] if isinstance(out, tuple) else out).backward()
            return out
        return step

    eager = make(loss_fn)
    return GuardedCompiled(eager, make(compiled) if compiled is not loss_fn else eager, what, on_fail=on_fail)


def human_mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def isfinite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
