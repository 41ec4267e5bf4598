"""Full-size architectures with random weights, from the published configs in benchmarks/configs/.

Random weights are honest for speed and for parity against diffusers' own pipelines, never for quality.

Tokenizers: the real CLIP BPE vocabulary cannot be fetched offline, so the checkpoint gets a byte-level CLIP BPE
tokenizer built here (a few hundred tokens, same special-token layout, padded to 77). The text encoder keeps its
published 49,408-entry embedding table; tokenization only picks which rows are read, so text-encoder cost is
unchanged.

    fewstep bench random-weights benchmarks/configs/sd-turbo /tmp/sd-turbo-random [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def byte_level_clip_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP BPE tokenizer over the byte alphabet plus a few merges, written to ``folder`` (vocab.json,
    merges.txt) and returned. Built offline; used for tiny test models and random-weight benchmark models."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = [("r", "e"), ("e", "d</w>"), ("c", "i"), ("a", "r"), ("o", "n"), ("b", "l")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_random_checkpoint(config_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                            seed: int = 0, device: str | None = None) -> Path:
    """Instantiate every component of ``config_dir`` with random weights and save a loadable checkpoint."""
    import diffusers
    import transformers

    config_dir, out_dir = Path(config_dir), Path(out_dir)
    marker = out_dir / ".complete"
    if marker.is_file() and marker.read_text() == str(dtype):
        return out_dir
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    index = json.loads((config_dir / "model_index.json").read_text())
    shutil.copy(config_dir / "model_index.json", out_dir / "model_index.json")
    torch.manual_seed(seed)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        lib, cls_name = entry
        src, dst = config_dir / name, out_dir / name
        if cls_name.endswith("Scheduler"):
            shutil.copytree(src, dst)
        elif "Tokenizer" in cls_name:
            max_len = (index.get("fewstep") or {}).get("max_sequence_length") or json.loads(
                (config_dir / "text_encoder" / "config.json").read_text()).get("max_position_embeddings", 77)
            byte_level_clip_tokenizer(out_dir / "_vocab", max_len).save_pretrained(dst)
        elif lib == "diffusers":
            cls = getattr(diffusers, cls_name)
            with torch.device(device):
                model = cls.from_config(cls.load_config(src))
            model.to(dtype).save_pretrained(dst, safe_serialization=True)
        else:
            cfg = transformers.AutoConfig.from_pretrained(src)
            with torch.device(device):
                model = getattr(transformers, cls_name)(cfg)
            model.to(dtype).save_pretrained(dst, safe_serialization=True)
    marker.write_text(str(dtype))
    return out_dir




def build_random_stream_default(out: str | Path, preset: str = "small", seed: int = 0) -> Path:
    """The default streaming-video model's architecture (training/video.py preset, StreamDiT + small CLIP) with
    untrained weights, exported through the same code as the trained student: for speed figures of the stream
    path (fps, time to first frame, per-frame cost over long streams) before or without the trained weights."""
    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    from fewstep.training.video import VIDEO_PRESETS, _video_tokenizer, build_video_model, export_video

    torch.manual_seed(seed)
    cfg = VIDEO_PRESETS[preset]
    tok = _video_tokenizer(cfg, seed, tiny=False)
    model = build_video_model(cfg, len(tok))
    return export_video(model, tok, out, cfg, {"status": "random weights (speed measurements only)"})


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fewstep bench random-weights`, built without side effects."""
    p = argparse.ArgumentParser(prog="fewstep bench random-weights", description=__doc__.splitlines()[0])
    p.add_argument("config_dir", help="benchmarks/configs/<arch>, or 'stream-default' for the default stream "
                   "model's architecture")
    p.add_argument("out_dir", help="where the checkpoint is written; one already complete there (same dtype) is "
                   "kept as it is, anything else there is replaced")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the saved weights (default float16; stream-default keeps the export's own)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights (default 0)")
    return p


def main() -> None:
    p = build_parser()
    a = p.parse_args()
    if a.config_dir == "stream-default":
        print(build_random_stream_default(a.out_dir, seed=a.seed))
        return
    print(build_random_checkpoint(a.config_dir, a.out_dir, getattr(torch, a.dtype), a.seed))


if __name__ == "__main__":
    main()
