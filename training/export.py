"""Write / read the shipped diffusers-style model directory (the serving loader depends on it).

::

    <dir>/model_index.json
    <dir>/transformer/{config.json, diffusion_pytorch_model.safetensors}   fp16 (a UNet denoiser: <dir>/unet/)
    <dir>/text_encoder/{config.json, model.safetensors}                    fp16
    <dir>/tokenizer/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}
    <dir>/scheduler/scheduler_config.json     FlowMatchEulerDiscreteScheduler(shift=1, 1000 steps)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from fewstep.training import data
from fewstep.training.common import dir_bytes, read_json, write_json
from fewstep.training.model import FewstepModel

PIPELINE_CLASS = "FewstepPixelPipeline"
DENOISER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
COMPONENT_FILES = {
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    "scheduler": ("scheduler_config.json",),
}


def denoiser_component(index: dict) -> str:
    """"unet" or "transformer": the denoiser folder of an export (or any diffusers-style folder), from its
    model_index.json."""
    return "unet" if "unet" in index else "transformer"


def export_model(model: FewstepModel, tokenizer, out_dir: str | Path, fewstep: dict,
                 pipeline_class: str = PIPELINE_CLASS,
                 transformer_entry: tuple[str, str] | None = None) -> Path:
    """Export ``model`` (any dtype/device; converted to fp16 copies on the CPU) atomically.

    ``model`` needs ``.transformer`` (a diffusers ModelMixin: the denoiser) and ``.text_encoder``; the
    denoiser's folder is ``model.denoiser_name`` ("transformer" unless it is a UNet). The video model
    (training/video.py) exports through here with ``FewstepStreamPipeline`` / ``["fewstep",
    "StreamDiTModel"]``."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    from diffusers.utils import logging as dlogging
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()   # "modules to keep in float32: []" notice on .to(fp16)
    try:
        transformer = copy.deepcopy(model.transformer).to("cpu", torch.float16).eval()
    finally:
        dlogging.set_verbosity(verbosity)
    comp = getattr(model, "denoiser_name", "transformer")
    if transformer_entry is None:
        from fewstep.engines import models as fewstep_models
        name = type(transformer).__name__
        transformer_entry = ("fewstep" if name in fewstep_models.__all__ else "diffusers", name)
    transformer.save_pretrained(tmp / comp, safe_serialization=True)
    text_encoder = copy.deepcopy(model.text_encoder).to("cpu", torch.float16).eval()
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    _drop_extra(tmp / "text_encoder", keep=COMPONENT_FILES["text_encoder"])

    tok_dir = tmp / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    tcfg = read_json(cfg_path)
    # a class name every transformers version resolves (v5 writes "TokenizersBackend")
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["model_max_length"] = int(tokenizer.model_max_length)
    tcfg["padding_side"] = "right"
    tcfg["truncation_side"] = "right"
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tcfg[k] = str(getattr(tokenizer, k))
    write_json(cfg_path, tcfg)
    # transformers v5 no longer writes this file; older loaders (and our format) expect it
    write_json(tok_dir / "special_tokens_map.json",
               {k: str(getattr(tokenizer, k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")})

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.save_pretrained(tmp / "scheduler")

    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        comp: list(transformer_entry),
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        # uniform flow sigmas: the student is trained on the 1/N grid (diffusers' default spacing is not it)
        # every caption of our grammar names its background, unless a stage trained with --drop-background; the
        # engine appends one to prompts without (FewStepPipeline.complete_prompt)
        "fewstep": {"flow_sigmas": "uniform", "prompt_completion": dict(data.PROMPT_COMPLETION), **fewstep},
    }
    write_json(tmp / "model_index.json", index)
    check_export(tmp)

    return replace_dir(tmp, out_dir)


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished export ``tmp`` into place at ``out_dir``, replacing any earlier one only once the new one is
    complete (a crash leaves the old export, never half of each)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def _drop_extra(d: Path, keep: tuple[str, ...]) -> None:
    # e.g. a generation_config.json some transformers versions add: not part of the format
    for f in d.iterdir():
        if f.is_file() and f.name not in keep:
            f.unlink()


def check_export(d: str | Path) -> dict:
    """Validate the directory layout + fp16 safetensors; returns a summary dict."""
    from safetensors import safe_open

    d = Path(d)
    idx = read_json(d / "model_index.json")
    den = denoiser_component(idx)
    for k in ("_class_name", "_diffusers_version", den, "text_encoder", "tokenizer",
              "scheduler", "fewstep"):
        if k not in idx:
            raise ValueError(f"model_index.json lacks {k}")
    for comp, files in ((den, DENOISER_FILES), *COMPONENT_FILES.items()):
        for f in files:
            if not (d / comp / f).is_file():
                raise ValueError(f"missing {comp}/{f}")
    n_params = {}
    for comp, f in ((den, DENOISER_FILES[1]), ("text_encoder", "model.safetensors")):
        n = 0
        with safe_open(str(d / comp / f), framework="pt") as sf:
            for key in sf.keys():
                t = sf.get_slice(key)
                if t.get_dtype() not in ("F16",):
                    raise ValueError(f"{comp}/{f}:{key} is {t.get_dtype()}, expected F16")
                shape = t.get_shape()
                c = 1
                for s in shape:
                    c *= s
                n += c
        n_params[comp] = n
    sch = read_json(d / "scheduler" / "scheduler_config.json")
    if sch.get("_class_name") != "FlowMatchEulerDiscreteScheduler" or float(sch.get("shift", 1.0)) != 1.0:
        raise ValueError("scheduler must be FlowMatchEulerDiscreteScheduler with shift=1.0")
    return {"params": n_params, "bytes": dir_bytes(d)}


def load_export(d: str | Path, device="cpu", dtype: torch.dtype | None = None, transformer_cls=None,
                wrapper=FewstepModel):
    """Load an exported directory -> (wrapper model, tokenizer, model_index dict). The image export by default;
    ``training.video.load_video_export`` passes the StreamDiT transformer and the VideoModel wrapper.

    ``dtype=None`` keeps fp16 on CUDA and uses fp32 on the CPU."""
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    d = Path(d)
    index = read_json(d / "model_index.json")
    comp = denoiser_component(index)
    if transformer_cls is None:
        import diffusers

        from fewstep.engines import models as fewstep_models
        lib, name = index[comp]
        transformer_cls = getattr(fewstep_models if lib == "fewstep" else diffusers, name)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    tr = transformer_cls.from_pretrained(str(d / comp), torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(str(d / "text_encoder"), dtype=dtype)
    tok = PreTrainedTokenizerFast.from_pretrained(str(d / "tokenizer"))
    model = wrapper(te, tr).to(device, dtype).eval()
    return model, tok, index


def summarize(d: str | Path) -> str:
    info = check_export(d)
    p = info["params"]
    den = next(k for k in p if k != "text_encoder")
    return (f"{d}: {den} {p[den] / 1e6:.2f}M + text_encoder {p['text_encoder'] / 1e6:.2f}M "
            f"params, {info['bytes'] / 1e6:.2f} MB on disk (fp16)")


if __name__ == "__main__":  # pragma: no cover
    import sys
    print(json.dumps(check_export(sys.argv[1]), indent=2))
