"""Load diffusers-format checkpoint directories from local disk only.

A checkpoint is a directory with ``model_index.json`` and one folder per component, exactly as diffusers
writes it. Components load through their own diffusers / transformers classes. Nothing here may reach a hub:
paths must exist, ``local_files_only`` is always set, and weights must be safetensors (pickled ``.bin``/``.pt``
files can execute code on load, so they are refused with a message saying how to convert them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fewstep.engines")

# Belt and braces: even if a component config names a hub repo somewhere, the libraries must not try to fetch it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_FILES = {
    "diffusers": "diffusion_pytorch_model.safetensors",
    "transformers": "model.safetensors",
    "fewstep": "diffusion_pytorch_model.safetensors",  # our own ModelMixin classes (fewstep.engines.models)
}
DENOISERS = ("unet", "transformer")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served. The message names the file to add or change."""


@dataclass
class Checkpoint:
    path: Path
    pipeline_class: str
    index: dict[str, Any]
    components: dict[str, Any] = field(default_factory=dict)  # name -> loaded module / tokenizer
    scheduler_class: str = ""
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser_name(self) -> str:
        return next(n for n in DENOISERS if n in self.components)

    @property
    def meta(self) -> dict[str, Any]:
        """fewstep's own hints in model_index.json (defaults for steps, guidance, size); optional."""
        return self.index.get("fewstep", {}) or {}

    def content_hash(self) -> str:
        return checkpoint_hash(self.path)


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist (fewstep loads local directories only)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{index_file} is missing: a diffusers-format model directory needs model_index.json")
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_file} is not valid JSON: {e}") from None


def model_kind(path: str | os.PathLike) -> str:
    """model_index.json's fewstep.kind: "image" (the default) or "video" (stream sessions)."""
    kind = (read_index(path).get("fewstep") or {}).get("kind", "image")
    if kind not in ("image", "video"):
        raise CheckpointError(f"{Path(path) / 'model_index.json'}: fewstep.kind must be 'image' or 'video', got "
                              f"{kind!r}")
    return kind


def _component_entries(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    out = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        lib, cls = value
        if lib is None or cls is None:  # diffusers writes [null, null] for optional absent components
            continue
        out[name] = (lib, cls)
    return out


def _check_weights(folder: Path, lib: str) -> str | None:
    """Return the variant to load ("fp16" or None); raise if weights are missing or pickled."""
    safes = sorted(p.name for p in folder.glob("*.safetensors"))
    if not safes and (folder / f"{WEIGHT_FILES[lib]}.index.json").is_file():
        raise CheckpointError(f"{folder}: sharded index present but its .safetensors shards are missing")
    if safes:
        if WEIGHT_FILES[lib] in safes or any(".fp16." not in s for s in safes):
            return None
        return "fp16"
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{folder / pickled[0]} is a pickled weight file; fewstep loads safetensors only, because unpickling "
            "can run arbitrary code. Convert it once with: python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{pickled[0]}', weights_only=True), '{WEIGHT_FILES[lib]}')\" in that folder"
        )
    raise CheckpointError(f"{folder / WEIGHT_FILES[lib]} is missing (no safetensors weights for this component)")


# VAE classes that --vae accepts: a full KL autoencoder, or a tiny one (TAESD's format, the decoder real-time servers
# use for speed). Both decode `latents / scaling_factor` (TAESD's scaling_factor is 1) to [-1, 1].
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def load_vae(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers VAE from its own directory (``config.json`` + safetensors weights), e.g. ``--vae /models/taesd``."""
    import diffusers

    folder = Path(folder).resolve()
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"VAE directory {str(folder)!r} does not exist (fewstep loads local directories only)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: --vae takes a diffusers VAE directory (config.json and "
                              f"{WEIGHT_FILES['diffusers']})")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if cls_name not in VAE_CLASSES:
        raise CheckpointError(f"{cfg_file}: _class_name is {cls_name!r}; --vae loads {' or '.join(VAE_CLASSES)}")
    variant = _check_weights(folder, "diffusers")
    vae = getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                       torch_dtype=dtype, **({"variant": variant} if variant else {}))
    return vae.to(device).eval().requires_grad_(False)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, vae: str | os.PathLike | None = None) -> Checkpoint:
    """Load every component named in model_index.json onto ``device`` in ``dtype``; ``vae``: a VAE directory that
    replaces the checkpoint's own (``load_vae``)."""
    import diffusers
    import transformers

    from . import models as fewstep_models

    path = Path(path).resolve()
    index = read_index(path)
    ckpt = Checkpoint(path=path, pipeline_class=index.get("_class_name", ""), index=index)
    libs = {"diffusers": diffusers, "transformers": transformers, "fewstep": fewstep_models}

    for name, (lib, cls_name) in _component_entries(index).items():
        folder = path / name
        if lib not in libs:
            raise CheckpointError(f"{path / 'model_index.json'}: component {name!r} comes from library {lib!r}; "
                                  "fewstep loads diffusers, transformers and fewstep components only")
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing (model_index.json lists component {name!r})")
        cls = getattr(libs[lib], cls_name, None)
        if cls is None:
            raise CheckpointError(f"{path / 'model_index.json'}: {lib} has no class {cls_name!r} for {name!r} "
                                  f"(installed {lib} {getattr(libs[lib], '__version__', '')})")
        if name == "scheduler" or cls_name.endswith("Scheduler"):
            cfg_file = folder / "scheduler_config.json"
            if not cfg_file.is_file():
                raise CheckpointError(f"{cfg_file} is missing")
            ckpt.scheduler_class = cls_name
            ckpt.scheduler_config = json.loads(cfg_file.read_text())
            continue
        if "Tokenizer" in cls_name or "Processor" in cls_name:
            try:
                ckpt.components[name] = cls.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise CheckpointError(f"{folder}: cannot load tokenizer {cls_name}: {e}") from None
            continue
        cfg_name = "config.json"
        if not (folder / cfg_name).is_file():
            raise CheckpointError(f"{folder / cfg_name} is missing")
        variant = _check_weights(folder, lib)
        kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
        if variant:
            kwargs["variant"] = variant
        # transformers >= 5 calls it `dtype`, diffusers and older transformers `torch_dtype`.
        kwargs["dtype" if lib == "transformers" and int(transformers.__version__.split(".")[0]) >= 5
               else "torch_dtype"] = dtype
        module = cls.from_pretrained(folder, **kwargs)
        ckpt.components[name] = module.to(device).eval().requires_grad_(False)

    if vae is not None:
        own = ckpt.components.get("vae")
        ckpt.components["vae"] = load_vae(vae, device, dtype)
        new_cfg = ckpt.components["vae"].config
        if own is not None and own.config.get("latent_channels") != new_cfg.get("latent_channels"):
            raise CheckpointError(f"{vae}: the VAE has {new_cfg.get('latent_channels')} latent channels, the "
                                  f"checkpoint's {own.config.get('latent_channels')}: it cannot decode this model")
        log.info("VAE from %s (%s) replaces the checkpoint's", vae, type(ckpt.components["vae"]).__name__)
        del own
    if not any(n in ckpt.components for n in DENOISERS):
        raise CheckpointError(f"{path / 'model_index.json'} lists no denoiser: expected a 'unet' or 'transformer' "
                              "component")
    if not ckpt.scheduler_class:
        raise CheckpointError(f"{path / 'scheduler' / 'scheduler_config.json'} is missing: the scheduler config "
                              "defines the timestep schedule the checkpoint was distilled on")
    return ckpt


def checkpoint_hash(path: str | os.PathLike) -> str:
    """Content hash over every config and weight file (names, sizes and bytes); keys engine caches."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
