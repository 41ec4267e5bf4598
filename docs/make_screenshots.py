"""Screenshots for the README: the browser page in image mode (page.png) and in stream mode (page-stream.png), and
a sheet of images from the embedded image model (images.png). Starts a real `fewstep serve` on the CPU (the
installed console script next to this interpreter) and drives Debian's Chromium with Playwright.

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
        models = {m["kind"]: m for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        if "--page-only" not in sys.argv:
            images(url, out / "images.png", models["image"]["example_prompts"][:4])
        page(url, out / "page.png", out / "page-stream.png")
    finally:
        server.terminate()
        server.wait(30)


def images(url: str, path: Path, prompts: list[str]) -> None:
    """One row per prompt (the model's own example prompts): 4 seeds of the served one-step model, upscaled 3x
    (nearest) so the 64 px images read."""
    import base64
    import io

    from PIL import Image, ImageDraw

    cell, pad, label_w = 192, 8, 360
    sheet = Image.new("RGB", (label_w + 4 * (cell + pad), len(prompts) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        r = httpx.post(url + "/v1/images/generations", json={"prompt": prompt, "n": 4, "seed": 0}, timeout=120)
        r.raise_for_status()
        for col, d in enumerate(r.json()["data"]):
            im = Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).resize((cell, cell), Image.NEAREST)
            sheet.paste(im, (label_w + col * (cell + pad), row * (cell + pad)))
        draw.text((8, row * (cell + pad) + cell // 2), prompt, fill="black")
    sheet.save(path)
    print(f"wrote {path}")


def page(url: str, image_path: Path, stream_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium", headless=True,
                                                   args=FLAGS, viewport={"width": 1100, "height": 820})
        pg = ctx.new_page()
        # image mode: two example prompts, four seeds each, newest first
        pg.goto(url + "/#image")
        pg.wait_for_function("window.fewstep.modelsLoaded === true", timeout=60_000)
        pg.fill("#img-seed", "0")
        for i in (1, 0):
            pg.locator("#examples .chip").nth(i).click()
            pg.wait_for_function(f"window.fewstep.images.length >= {4 * (2 - i)} && !window.fewstep.generating",
                                 timeout=120_000)
        pg.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)")
        pg.screenshot(path=str(image_path))
        print(f"wrote {image_path}")
        # stream mode: the video model's first example prompt, seeded
        pg.click("#tab-stream")
        pg.fill("#seed", "3")
        pg.click("#start")
        try:
            pg.wait_for_function("window.fewstep.framesReceived >= 40 && window.fewstep.stats", timeout=120_000)
            pg.wait_for_timeout(600)  # a readout refresh (every 250 ms) after the stats message
        finally:
            print(pg.evaluate("({...window.fewstep, started: null, stats: null, images: null, models: null})"))
            pg.screenshot(path=str(stream_path))
        ctx.close()
    print(f"wrote {stream_path}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(args[0] if args else "docs/images"))
