"""Screenshots of the live page playing a real model: what a person sees in the browser.

Starts the Serve app on a model (a bundle folder or `models:/name@alias`; local Ray), opens the
page in headless Chromium with `?autostart=1`, and captures the player's canvas every
`--every` seconds while the clip plays, then writes them side by side as one PNG with each
shot's appearance figures (data.sync.appearance: ball visible, peak contrast, radius) and the
page's own first-frame time and generation fps.

    python -m benchmarks.page_screenshot --model runs/demo/student-bundle --out page.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from matplotlib import image as mpimg
from matplotlib import pyplot as plt

from benchmarks.browser import DevTools, open_chromium
from data.sync import appearance


@contextlib.contextmanager
def serving(model: str, max_seconds: int) -> Iterator[str]:
    """The Serve app on `model` (local Ray, a free port) until the block ends; yields its URL."""
    import httpx
    import ray
    from ray import serve

    from data.local_s3 import free_port
    from deploy.cli import start_serve

    port = free_port()
    try:
        start_serve(model, port=port, max_streams=1, max_seconds=max_seconds, num_cpus=8)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # a replica loads its model before /healthz answers
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def _canvas(browser: DevTools) -> np.ndarray:
    """The player canvas as uint8 [H, W, 3] (inside its 1 px border)."""
    rect = json.loads(
        browser.eval("JSON.stringify(document.getElementById('screen').getBoundingClientRect())")
    )
    clip = {k: rect[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png", clip=clip)["data"])
    pixels = mpimg.imread(io.BytesIO(png), format="png")[1:-1, 1:-1, :3]
    return (pixels * 255).round().astype(np.uint8)


def capture(url: str, prompt: str, seconds: int, seed: int, every: float) -> tuple[list, dict]:
    """Play one clip on the page at `url`; return ([(t, shot)], the page's window.omni)."""
    query = urllib.parse.urlencode(
        {"autostart": 1, "seconds": seconds, "seed": seed, "prompt": prompt}
    )
    shots: list[tuple[float, np.ndarray]] = []
    with open_chromium() as browser:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{url}/?{query}")
        t0, omni, next_shot = time.monotonic(), {}, every
        while time.monotonic() - t0 < 60 + 4 * seconds:
            state = browser.eval("JSON.stringify(window.omni || null)")
            omni = json.loads(state) if state else {}
            if omni.get("state") in ("done", "error"):
                break
            if omni.get("framesDrawn") and time.monotonic() - t0 >= next_shot:
                shots.append((time.monotonic() - t0, _canvas(browser)))
                next_shot += every
            time.sleep(0.05)
        if omni.get("state") == "done":
            shots.append((time.monotonic() - t0, _canvas(browser)))  # the last frame drawn
    return shots, omni


def save_strip(shots: list, omni: dict, title: str, out: Path) -> list[dict]:
    figures = [appearance(shot[None]) for _, shot in shots]
    fig, axes = plt.subplots(1, len(shots), figsize=(2.6 * len(shots), 3.4), squeeze=False)
    for ax, (t, shot), fig_ in zip(axes[0], shots, figures, strict=True):
        ax.imshow(shot)
        ax.set_axis_off()
        ax.set_title(
            f"t={t:.1f} s  contrast {fig_['ball_contrast']:.2f}\n"
            f"radius {fig_['ball_radius_px']:.0f} px (canvas)",
            fontsize=8,
        )
    fig.suptitle(
        f"{title}: first frame {omni.get('firstFrameMs', 0):.0f} ms, "
        f"generated at {omni.get('genFps', 0):.0f} fps",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the title
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundle folder or models:/name@alias")
    p.add_argument("--prompt", default="a small red ball moving up-left with a high ping")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=float, default=1.0, help="seconds between screenshots")
    p.add_argument("--out", type=Path, default=Path("page.png"))
    args = p.parse_args()
    with serving(args.model, max(10, args.seconds)) as url:
        shots, omni = capture(url, args.prompt, args.seconds, args.seed, args.every)
    if omni.get("state") != "done" or not shots:
        raise SystemExit(f"the page did not play the clip: {omni}")
    figures = save_strip(shots, omni, f"{args.model} — {args.prompt!r}", args.out)
    page = {k: omni.get(k) for k in ("chunks", "framesReceived", "firstFrameMs", "genFps")}
    print(json.dumps({"page": page, "shots": figures}, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
