"""A Serve replica killed (SIGKILL) mid-stream (issue 26 item 4), on a real local Serve app.

The `synthetic:` backend takes DELAY s per chunk, so a long clip is still streaming when the test
kills the replica's process (its pid, from `/healthz`). Serve's proxy cannot send an error part
for a replica that is gone: it drops the client's connection (HTTP: the chunked body is cut;
WebSocket: no close frame, code 1006). `deploy/client.py` turns either into `StreamBroken`,
naming the server and the last chunk index, at once (bounded here by the client's timeout, never
a hang). Serve then starts a new replica (its health check, every 2 s, finds the dead one):
`/healthz` answers again from another pid, and the next request streams completely, also one
sent during the replacement (the proxy holds it until the new replica is up). Recovery times are printed (`-s`) for docs/operations.md.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from deploy.client import StreamBroken, save_stream, stream_http, stream_ws
from deploy.protocol import Part
from tests.fixtures.serve import running_serve, wait_for

DELAY = 0.2  # s per chunk: a MAX_SECONDS clip takes ≥ 120 s, far longer than the test waits
MAX_SECONDS = 600
TIMEOUT = 30.0  # the client's read timeout: what a hang would cost at most


@pytest.fixture(scope="module")
def server(ray_local) -> Iterator[str]:
    with running_serve(f"synthetic:{DELAY}", max_streams=4, max_seconds=MAX_SECONDS) as url:
        yield url


def _health(url: str) -> dict:
    r = httpx.get(url + "/healthz", timeout=5)
    return r.json() if r.status_code == 200 else {}


def _kill_mid_stream(url: str, parts: Iterator[Part]) -> tuple[BaseException | None, list, int]:
    """Read `parts` in a thread; after two chunks SIGKILL the replica. Returns what the reader
    raised, the parts it got and the dead replica's pid; fails if the reader hangs."""
    pid, got, raised = _health(url)["pid"], [], []

    def read() -> None:
        try:
            save_stream((got.append(p) or p for p in parts), None)
        except BaseException as err:  # noqa: BLE001 — asserted on by the caller
            raised.append(err)

    reader = threading.Thread(target=read, daemon=True, name="replica-death-reader")
    reader.start()
    wait_for(lambda: sum(p.type == "chunk" for p in got) >= 2, 60, "two chunks")
    assert _health(url)["active_streams"] == 1
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    reader.join(timeout=TIMEOUT + 15)
    assert not reader.is_alive(), "the client hung after its replica was killed"
    print(f"client saw the break {time.monotonic() - t0:.2f} s after the kill")
    return (raised[0] if raised else None), got, pid


def _recovers(url: str, dead_pid: int, request_first: bool = False) -> float:
    """Seconds until `/healthz` answers from a new replica, with a whole clip streamed from it:
    after that answer, or (`request_first`) sent at once, while Serve is still replacing the
    replica (the proxy holds it until the new replica is up)."""
    t0 = time.monotonic()

    def clip() -> None:
        stats = save_stream(stream_http(url, "after the kill", 2, seed=1, timeout=60), None)
        assert stats.chunks == 3 and stats.frames == 49 and not stats.cancelled
        print(f"a new request streamed a whole clip {time.monotonic() - t0:.1f} s after the kill")

    def new_replica() -> dict:
        health = _health(url)
        return health if health.get("pid") not in (None, dead_pid) else {}

    if request_first:
        clip()
    health = wait_for(new_replica, 90, "/healthz from a new replica")
    recover_s = time.monotonic() - t0
    print(f"/healthz answered from a new replica {recover_s:.1f} s after the kill")
    if not request_first:
        clip()
    now = _health(url)
    assert now["pid"] == health["pid"] and now["active_streams"] == 0
    return recover_s


def test_http_stream_gets_a_clear_error_when_its_replica_dies(server: str) -> None:
    parts = stream_http(server, "a ball", MAX_SECONDS, timeout=TIMEOUT)
    err, got, pid = _kill_mid_stream(server, parts)
    assert isinstance(err, StreamBroken), err
    last = max(p.header["index"] for p in got if p.type == "chunk")
    assert err.last_chunk == last and err.status == 502
    assert f"stream from {server} broke after chunk {last} (no end part)" in str(err)
    assert [p.type for p in got][-1] == "chunk"  # no end part was made up
    assert _recovers(server, pid) < 60


def test_websocket_stream_gets_a_close_code_when_its_replica_dies(server: str) -> None:
    parts = stream_ws(server, "a ball", MAX_SECONDS, timeout=TIMEOUT)
    err, got, pid = _kill_mid_stream(server, parts)
    assert isinstance(err, StreamBroken), err
    assert err.close_code not in (None, 1000), err.close_code
    last = max(p.header["index"] for p in got if p.type == "chunk")
    assert err.last_chunk == last
    assert f"broke after chunk {last} (no end part): WebSocket closed with code" in str(err)
    assert _recovers(server, pid, request_first=True) < 60


def test_a_silent_server_gives_stream_broken_after_the_timeout_not_a_hang() -> None:
    """No Serve: servers that send the start part and then nothing (a hung replica behind a
    proxy that keeps the connection) end the client's stream after its `timeout`."""
    import socket

    from websockets.sync.server import serve as ws_serve

    from deploy.protocol import MEDIA_TYPE, encode_part

    start = encode_part({"type": "start"})
    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def http_server() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-type: {MEDIA_TYPE}\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        conn.sendall(head.encode() + f"{len(start):x}\r\n".encode() + start + b"\r\n")
        release.wait(30)
        conn.close()

    def ws_handler(ws) -> None:
        ws.recv()
        ws.send(start)
        release.wait(30)

    threading.Thread(target=http_server, daemon=True).start()
    with ws_serve(ws_handler, "127.0.0.1", 0) as ws_server:
        threading.Thread(target=ws_server.serve_forever, daemon=True).start()
        urls = {
            "http": (stream_http, f"http://127.0.0.1:{listener.getsockname()[1]}"),
            "ws": (stream_ws, f"http://127.0.0.1:{ws_server.socket.getsockname()[1]}"),
        }
        try:
            for name, (fn, url) in urls.items():
                t0 = time.monotonic()
                with pytest.raises(StreamBroken, match="broke before its first chunk") as info:
                    save_stream(fn(url, "a", 5, timeout=1.0), None)
                assert time.monotonic() - t0 < 10, name
                assert url in str(info.value) and info.value.last_chunk is None
        finally:
            release.set()
            ws_server.shutdown()
            listener.close()
