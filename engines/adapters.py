"""Guidance adapters (AGD-style): one denoiser pass per step in place of CFG's doubled batch.

Adapter Guidance Distillation trains small low-rank adapters on a frozen denoiser's attention projections so that
one forward pass, told the guidance scale, predicts what CFG's two passes would combine. Each adapted projection is

    y = W x + b + s * B (A x)          A: [r, in], B: [out, r], s: one scale per sample

where the guidance-scale embedding of such adapters reduces to the per-sample scale ``s``; fewstep feeds
``s = guidance_scale - 1`` (0 at guidance 1: the adapters are off and the model is the plain conditional one).
:class:`AdapterLinear` runs this as one Triton GEMM on CUDA (kernels/adapter_linear.py) and as torch ops elsewhere.

Adapters sit on ``to_q``/``to_k``/``to_v``/``to_out.0`` of the ``attn1``/``attn2`` modules (AGD's placements) and
are stored apart from the checkpoint, as a component folder::

    adapters/config.json                               {"format": "fewstep-guidance-adapters", "rank": r, ...}
    adapters/diffusion_pytorch_model.safetensors       "<module path>.lora_A" [r, in], "<module path>.lora_B" [out, r]

``fewstep serve/generate --adapters DIR`` loads them, or an ``adapters/`` folder beside a checkpoint's components
is picked up. No trained adapters ship with fewstep: ``fewstep train agd`` (training/agd.py) trains them for the
embedded teacher; ``random_adapters`` makes random ones for speed runs only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMAT = "fewstep-guidance-adapters"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTIONS = ("attn1", "attn2")

__all__ = ["AdapterLinear", "AdapterState", "attach_adapters", "find_adapters", "load_adapters", "random_adapters",
           "save_adapters"]


@dataclass
class AdapterState:
    """Shared by a model's adapters: the per-sample scale of the current forward (None: adapters off)."""

    rank: int
    names: list[str] = field(default_factory=list)  # module paths of the adapted projections
    scale: torch.Tensor | None = None  # [B] fp32
    use_kernel: bool = True


class AdapterLinear(nn.Module):
    """An ``nn.Linear`` plus a low-rank adapter scaled per sample by ``state.scale`` (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, state: AdapterState):
        super().__init__()
        self.base = base
        self.state = state
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=w.device, dtype=w.dtype),
                                   requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype),
                                   requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # diffusers reads projection weights' dtype and shape
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.state.scale
        if s is None:
            return self.base(x)
        rows = x.shape[0]
        if s.numel() not in (1, rows):
            raise ValueError(f"adapter scale has {s.numel()} entries for a batch of {rows}")
        if self._kernel_applies(x):
            from fewstep.kernels.adapter_linear import adapter_linear

            s = s.to(x.device).reshape(-1).expand(rows).contiguous()
            return adapter_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, s)
        y = self.base(x)
        low = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return y + s.to(device=x.device, dtype=y.dtype).view(-1, *([1] * (x.dim() - 1))) * low

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        if not (self.state.use_kernel and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return False
        if torch.compiler.is_compiling():
            return False
        from fewstep.kernels.adapter_linear import HAS_TRITON, MAX_RANK

        return HAS_TRITON and self.lora_A.shape[0] <= MAX_RANK and x.dtype == self.base.weight.dtype


def _targets(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(path, parent, attribute, linear) of every adaptable projection."""
    out = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in ATTENTIONS or not hasattr(module, "to_q"):
            continue
        for proj in PROJECTIONS:
            parent, attr = module, proj
            if proj == "to_out.0":
                parent, attr = module.to_out, "0"
            lin = getattr(parent, attr, None) if attr != "0" else parent[0]
            if isinstance(lin, AdapterLinear):
                lin = lin.base
            if isinstance(lin, nn.Linear):
                out.append((f"{name}.{proj}", parent, attr, lin))
    return out


def attach_adapters(model: nn.Module, rank: int) -> AdapterState:
    """Wrap the attention projections of ``model`` in zero-initialised :class:`AdapterLinear` modules."""
    if not 1 <= rank <= 256:
        raise ValueError(f"adapter rank must be 1..256, got {rank}")
    state = AdapterState(rank)
    for path, parent, attr, lin in _targets(model):
        wrapped = AdapterLinear(lin, rank, state)
        if attr == "0":
            parent[0] = wrapped
        else:
            setattr(parent, attr, wrapped)
        state.names.append(path)
    if not state.names:
        raise ValueError(f"{type(model).__name__} has no attn1/attn2 projections to adapt")
    model._fewstep_adapters = state
    return state


def adapter_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, "_fewstep_adapters", None)


def _modules(model: nn.Module) -> dict[str, AdapterLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    state = adapter_state(model)
    if state is None:
        raise ValueError("the model has no adapters attached")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in _modules(model).items():
        path = name.removesuffix(".base")
        tensors[f"{path}.lora_A"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{path}.lora_B"] = m.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps({
        "format": FORMAT, "rank": state.rank, "targets": sorted(state.names), "scale": "guidance_scale - 1",
        "model": type(model).__name__}, indent=1) + "\n")
    return directory


class AdapterError(ValueError):
    """An adapters folder that cannot be loaded onto this model (the message says what is wrong)."""


def load_adapters(model: nn.Module, directory: str | Path) -> AdapterState:
    """Attach adapters to ``model`` and load their weights from ``directory`` (safetensors only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise AdapterError(f"{directory}: an adapters folder needs {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("rank"), int):
        raise AdapterError(f'{cfg_path}: expected {{"format": "{FORMAT}", "rank": INT, ...}}')
    state = attach_adapters(model, cfg["rank"])
    tensors = load_file(str(weights))
    mods = {name.removesuffix(".base"): m for name, m in _modules(model).items()}
    expected = {f"{p}.lora_{x}" for p in mods for x in "AB"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(f"{weights}: {len(missing)} adapter tensors missing (e.g. {missing[:2]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}) for {type(model).__name__}")
    for path, m in mods.items():
        for x, param in (("A", m.lora_A), ("B", m.lora_B)):
            t = tensors[f"{path}.lora_{x}"]
            if t.shape != param.shape:
                raise AdapterError(f"{weights}: {path}.lora_{x} is {tuple(t.shape)}, the model needs "
                                   f"{tuple(param.shape)}")
            param.data.copy_(t.to(param.dtype))
    return state


def random_adapters(model: nn.Module, rank: int, seed: int = 0, std: float = 0.02) -> AdapterState:
    """Attach adapters with random weights: speed and plumbing runs only (they are not trained)."""
    state = attach_adapters(model, rank)
    g = torch.Generator("cpu").manual_seed(seed)
    for m in _modules(model).values():
        for p in (m.lora_A, m.lora_B):
            p.data.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return state


def find_adapters(checkpoint: str | Path) -> Path | None:
    """The ``adapters/`` folder beside a checkpoint's components, if there is one."""
    d = Path(checkpoint) / "adapters"
    return d if (d / CONFIG).is_file() else None
