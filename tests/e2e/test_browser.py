"""The page at / in a real browser: headless Debian Chromium (/usr/bin/chromium, installed by `.ci/run` with
apt-get; no browser download), driven by Playwright against a real `fewstep serve` on the tiny video model.

The page exposes what it measures on ``window.fewstep`` (frames received and drawn, session id, frame hashes, fps,
time to first frame, drops); the tests read that, click the page's own controls and take real screenshots.
"""

import io
import os
import tempfile
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent: install Debian's "
                                "chromium package (apt-get install -y chromium; .ci/run does)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # in the test extra; never `playwright install`

    with tempfile.TemporaryDirectory(prefix="fewstep-chromium-") as profile, sync_playwright() as p:
        # a persistent context on a fresh directory is Chromium's --user-data-dir (Playwright refuses the raw flag)
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                   viewport={"width": 1000, "height": 800})
        try:
            yield ctx
        finally:
            ctx.close()


def state(page) -> dict:
    return page.evaluate("({...window.fewstep, started: null, stats: null})")


def wait_frames(page, n: int, timeout_s: float = 30) -> None:
    page.wait_for_function(f"window.fewstep.framesReceived >= {n}", timeout=timeout_s * 1000)


def start(page, url: str, seed: int, prompt: str | None = None, fps: int = 30) -> None:
    page.goto(url + "/")
    if prompt is not None:
        page.fill("#prompt", prompt)
    page.fill("#seed", str(seed))
    page.fill("#fps", str(fps))
    page.click("#start")


def test_page_streams_updates_prompt_and_draws(stream_server, browser, tmp_path):
    from PIL import Image, ImageStat

    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        start(page, stream_server.url, seed=7)
        wait_frames(page, 30)
        s = state(page)
        assert s["state"] == "running" and s["sessionId"] and s["errors"] == []
        assert s["lastIndex"] >= 29 and s["ttffMs"] is not None and s["ttffMs"] > 0
        assert page.inner_text("#session-id") == s["sessionId"]
        # a live prompt change: acknowledged, reaches the frames (prompt version 1), and frames keep coming
        before = s["framesReceived"]
        page.fill("#prompt", "a lighthouse in a storm at night")
        page.click("#update")
        page.wait_for_function("window.fewstep.promptVersion >= 1", timeout=30_000)
        wait_frames(page, before + 30)
        assert "prompt updated" in page.inner_text("#status")
        # on-screen readouts, measured in the browser
        page.wait_for_function("document.getElementById('fps-readout').textContent !== '-'", timeout=10_000)
        assert float(page.inner_text("#fps-readout")) > 0
        assert page.inner_text("#ttff-readout").endswith(" ms")
        assert page.inner_text("#dropped-readout").isdigit()
        assert int(page.inner_text("#frames-readout")) >= before
        assert state(page)["framesDrawn"] > 0
        # the screenshot is not blank
        page.screenshot(path=str(tmp_path / "page.png"))
        shot = Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB")
        stddev = ImageStat.Stat(shot).stddev
        assert max(stddev) > 10, f"canvas looks blank (per-channel stddev {stddev})"
        assert len(set(shot.resize((32, 32)).getdata())) > 50  # many colours, not a flat fill
        page.click("#stop")
        page.wait_for_function("window.fewstep.state === 'stopped'", timeout=10_000)
        assert errors == []
    finally:
        page.close()


def test_two_tabs_get_only_their_own_frames_and_stop_independently(stream_server, browser):
    a, b = browser.new_page(), browser.new_page()
    try:
        prompt = "two tabs, one prompt"
        start(a, stream_server.url, seed=1, prompt=prompt)
        start(b, stream_server.url, seed=2, prompt=prompt)
        wait_frames(a, 30)
        wait_frames(b, 30)
        sa, sb = state(a), state(b)
        assert sa["sessionId"] and sb["sessionId"] and sa["sessionId"] != sb["sessionId"]
        # seeded differently: each tab's frames are its own, none crosses over
        assert not set(sa["hashes"]) & set(sb["hashes"]), "a frame of one tab reached the other"
        assert sa["droppedServer"] == 0 and sb["droppedServer"] == 0
        # stopping A does not disturb B
        a.click("#stop")
        a.wait_for_function("window.fewstep.state === 'stopped'", timeout=10_000)
        stopped_at = state(a)["framesReceived"]
        b_before = state(b)["framesReceived"]
        wait_frames(b, b_before + 30)
        time.sleep(0.3)
        sa2, sb2 = state(a), state(b)
        assert sa2["framesReceived"] == stopped_at  # A really stopped
        assert sb2["state"] == "running" and sb2["errors"] == []
        assert sb2["lastIndex"] == sb2["framesReceived"] - 1  # B's indices never skipped: contiguous
        assert not set(sa2["hashes"]) & set(sb2["hashes"])
    finally:
        a.close()
        b.close()


def test_page_streams_with_an_api_key_kept_in_local_storage(tiny_dir, browser):
    """A server with a key: the page's key field goes to the WebSocket as ?token=, survives a reload (localStorage),
    and without it the page says the connection was refused."""
    from tests.conftest import ServerProcess

    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
                         "--api-key", "page-key"])
    page = browser.new_page()
    try:
        page.goto(srv.url + "/")
        page.evaluate("localStorage.removeItem('fewstep.apiKey')")
        page.click("#start")  # no key: refused before the handshake
        page.wait_for_function("window.fewstep.state === 'closed'", timeout=30_000)
        assert "check the API key" in page.inner_text("#status")
        page.fill("#key", "page-key")
        page.dispatch_event("#key", "change")
        page.reload()
        assert page.input_value("#key") == "page-key"
        start(page, srv.url, seed=3)
        wait_frames(page, 10)
        assert state(page)["state"] == "running"
        assert "page-key" not in srv.output()  # the access log never prints the token
    finally:
        page.close()
        srv.stop()
