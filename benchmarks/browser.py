"""Headless Chromium driven over the DevTools protocol (its own WebSocket; no extra packages):
`open_chromium()` yields a client on its page. Used by benchmarks/page_screenshot.py and by the
`browser` fixture of the tests (tests/fixtures/browser.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=900,800",
    "--remote-debugging-port=0",
]


class DevTools:
    """Minimal Chrome DevTools Protocol client: send a command, wait for its reply."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self._ids = ws, itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def _poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline, last_err = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except Exception as err:  # noqa: BLE001 — Chromium may still be starting
            last_err = err
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what} (last error: {last_err})")


@contextlib.contextmanager
def open_chromium(profile: Path | None = None) -> Iterator[DevTools]:
    """Start headless Chromium with a fresh profile; yield a DevTools client on its page."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(
            f"{CHROMIUM} missing: install it (scripts/setup.sh: apt-get install chromium)"
        )
    with contextlib.ExitStack() as stack:
        if profile is None:
            profile = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "profile"
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            _poll(lambda: port_file.exists() and port_file.read_text().strip(), 60, "chromium")
            port = int(port_file.read_text().split()[0])
            pages = _poll(
                lambda: [
                    t
                    for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                    if t["type"] == "page"
                ],
                30,
                "a chromium page target",
            )
            with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
                yield DevTools(ws)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
