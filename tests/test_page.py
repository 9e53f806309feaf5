"""Browser test: headless Chromium opens the live page of a real Serve app, streams a clip over the
WebSocket, and a screenshot of the canvas shows the ball a viewer should see (the `synthetic:`
backend draws a known ball: contrast, size, place and colour are checked, not just "something was
drawn"); the page reports its first-frame time. Chromium is driven over the DevTools protocol (its
own WebSocket), no extra packages. Real models stream over HTTP/WebSocket in tests/test_serve.py."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from benchmarks.browser import DevTools
from tests.fixtures.serve import running_serve


@pytest.fixture(scope="module")
def server(ray_local):
    with running_serve("synthetic:0.02", max_streams=2, max_seconds=10) as url:
        yield url


def test_page_plays_the_stream_and_reports_first_frame(
    server: str, browser: DevTools, tmp_path: Path
) -> None:
    browser.call("Page.enable")
    browser.call(
        "Page.navigate", url=f"{server}/?autostart=1&seconds=2&seed=4&prompt=a%20red%20ball"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = browser.eval("JSON.stringify(window.omni || null)")
        omni = json.loads(state) if state else None
        if omni and omni["state"] in ("done", "error"):
            break
        time.sleep(0.25)
    print("page state:", omni)
    assert omni and omni["state"] == "done", omni
    assert omni["error"] is None and omni["chunks"] == 3 and omni["framesReceived"] == 49
    assert omni["framesDrawn"] > 0 and omni["firstFrameMs"] > 0 and omni["genFps"] > 0
    assert omni["audioChunks"] == 3  # every chunk's PCM was scheduled on the WebAudio clock
    assert omni["maxSkewMs"] < 5  # sound scheduled where its frames are (same clock)
    assert omni["maxLateMs"] < 500  # frames drawn close to their slot (rAF ~16 ms + load)
    assert browser.eval("document.getElementById('ttff').textContent").endswith(" ms")
    assert "done: 3 chunks" in browser.eval("document.getElementById('status').textContent")

    rect = json.loads(
        browser.eval("JSON.stringify(document.getElementById('screen').getBoundingClientRect())")
    )
    clip = {k: rect[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
    shot = browser.call("Page.captureScreenshot", format="png", clip=clip)
    png = base64.b64decode(shot["data"])
    (tmp_path / "page.png").write_bytes(png)
    pixels = mpimg.imread(io.BytesIO(png), format="png")[1:-1, 1:-1, :3]  # inside the 1px border
    assert pixels.shape[:2] == (384, 384)
    # The last frame drawn is frame 48: the ball (radius 6 of 64 px, ×6 on the 384 px canvas) at
    # x = 8 + 96 mod 48 = 8 px, y = 32 px, in the colour seed 4 gives it, on a dark background.
    from data.sync import appearance

    shot_u8 = (pixels * 255).round().astype(np.uint8)
    seen = appearance(shot_u8[None])
    assert seen["ball_visible_frac"] == 1.0 and seen["ball_contrast"] > 0.25, seen
    assert 30 < seen["ball_radius_px"] < 42, seen
    fg = shot_u8.max(-1).astype(int) - 10
    ys, xs = np.nonzero(fg > 0.5 * fg.max())
    assert abs(xs.mean() - 8 * 6) < 6 and abs(ys.mean() - 32 * 6) < 6, (xs.mean(), ys.mean())
    colour = np.random.default_rng(4).integers(80, 256, size=3)
    assert np.abs(shot_u8[32 * 6, 8 * 6].astype(int) - colour).max() <= 6
