"""Screenshots for the README: the browser page streaming from the embedded video model, and images from the
embedded image model. Starts a real `fewstep serve` on the CPU and drives Debian's Chromium with Playwright.

    python3 docs/make_screenshots.py docs/images      # needs the test extra and /usr/bin/chromium
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
PROMPTS = ["a red circle above a blue square", "a green star left of a yellow triangle",
           "two purple squares on a black background", "a small orange cross right of a big blue circle"]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fewstep = Path(sys.executable).with_name("fewstep")
    server = subprocess.Popen([str(fewstep), "serve", "--device", "cpu", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if "--page-only" not in sys.argv:
            images(url, out / "images.png")
        page(url, out / "page.png")
    finally:
        server.terminate()
        server.wait(30)


def images(url: str, path: Path) -> None:
    """One row per prompt: 4 seeds of the served one-step model, upscaled 3x (nearest) so the 64 px images read."""
    import base64
    import io

    from PIL import Image, ImageDraw

    cell, pad, label_w = 192, 8, 360
    sheet = Image.new("RGB", (label_w + 4 * (cell + pad), len(PROMPTS) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(PROMPTS):
        r = httpx.post(url + "/v1/images/generations", json={"prompt": prompt, "n": 4, "seed": 0}, timeout=120)
        r.raise_for_status()
        for col, d in enumerate(r.json()["data"]):
            im = Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).resize((cell, cell), Image.NEAREST)
            sheet.paste(im, (label_w + col * (cell + pad), row * (cell + pad)))
        draw.text((8, row * (cell + pad) + cell // 2), prompt, fill="black")
    sheet.save(path)
    print(f"wrote {path}")


def page(url: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", headless=True,
                                                   args=FLAGS, viewport={"width": 1000, "height": 760})
        pg = ctx.new_page()
        pg.goto(url + "/")
        pg.fill("#prompt", "a red circle moving right on a white background")
        pg.fill("#seed", "3")
        pg.click("#start")
        try:
            pg.wait_for_function("window.fewstep.framesReceived >= 40", timeout=120_000)
        finally:
            print(pg.evaluate("({...window.fewstep, started: null, stats: null})"))
            pg.screenshot(path=str(path))
        ctx.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0] if args else "docs/images"))
