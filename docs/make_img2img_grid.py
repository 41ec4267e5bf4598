"""Image-to-image picture grid for the README: inputs drawn with PIL, the embedded default image model's answers at
strengths 0.3, 0.5 and 0.8 (one step each, seed 0), and each row's prompt. Runs the engine in-process on the CPU
(no server), through the installed package:

    python3 docs/make_img2img_grid.py docs/images/img2img.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.server.config import DEFAULT_MODEL_DIR

SIZE = 64  # the embedded image model's native size
SCALE = 3  # shown upscaled (nearest) so the 64 px answers are visible
STRENGTHS = (0.3, 0.5, 0.8)
SEED = 0


def canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def inputs() -> list[tuple[str, Image.Image]]:
    """(prompt, input picture) per row: a recolour, a change of shape, and a layout the prompt agrees with."""
    rows = []
    img, d = canvas()
    d.ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    rows.append(("a blue circle", img))
    img, d = canvas()
    d.rectangle((8, 20, 32, 44), fill=(40, 170, 60))
    rows.append(("a yellow triangle", img))
    img, d = canvas()
    d.rectangle((22, 6, 42, 26), fill=(30, 60, 220))
    d.ellipse((22, 36, 42, 56), fill=(220, 30, 30))
    rows.append(("a blue square above a red circle", img))
    return rows


def main(out: Path) -> None:
    torch.manual_seed(0)
    pipe = FewStepPipeline(load_checkpoint(DEFAULT_MODEL_DIR))
    rows = inputs()
    cell, pad, label_w, head_h = SIZE * SCALE, 8, 230, 24
    width = label_w + (1 + len(STRENGTHS)) * (cell + pad) + pad
    height = head_h + len(rows) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(grid)
    for j, title in enumerate(["input"] + [f"strength {s}" for s in STRENGTHS]):
        d.text((label_w + pad + j * (cell + pad), 6), title, fill=(0, 0, 0))
    for i, (prompt, img) in enumerate(rows):
        y = head_h + i * (cell + pad)
        d.text((pad, y + cell // 2 - 6), f'"{prompt}"', fill=(0, 0, 0))
        src = torch.from_numpy(np.array(img)[None])  # [1, 64, 64, 3] uint8
        tiles = [np.array(img)]
        for s in STRENGTHS:
            tiles.append(pipe([prompt], [SEED], init=src, strength=s)[0].numpy())
        for j, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(big, (label_w + pad + j * (cell + pad), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    print(f"wrote {out} ({width}x{height})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/img2img.png"))
