"""Python client: stream a clip from the server (HTTP or WebSocket) or generate it in-process,
write it to mp4 (H.264 + AAC) and measure time to first chunk, FPS and real-time factor.

Holds no server code; the framing is deploy/protocol.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from deploy.mp4writer import Mp4Writer
from deploy.protocol import Part, PartReader, decode_part


class ClientError(RuntimeError):
    """The server refused the request or sent an error part; `status` is the HTTP status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class StreamBroken(ClientError):
    """The stream stopped without its "end" or "error" part: the connection dropped (the replica
    or the proxy died, the network broke) or stayed silent for the client's `timeout`. Names the
    server, the last chunk index received (`last_chunk`, None if none) and, over WebSocket, the
    close code (`close_code`: 1006 when the socket closed without a close frame). `status` 502."""

    def __init__(
        self, url: str, last_chunk: int | None, reason: str, close_code: int | None = None
    ) -> None:
        after = "before its first chunk" if last_chunk is None else f"after chunk {last_chunk}"
        message = f"stream from {url} broke {after} (no end part): {reason}"
        RuntimeError.__init__(self, message)
        self.status, self.body = 502, message
        self.url, self.last_chunk, self.close_code = url, last_chunk, close_code


@dataclass
class StreamStats:
    ttfc_s: float = 0.0  # request sent -> first chunk part decoded
    elapsed_s: float = 0.0  # request sent -> end part
    chunks: int = 0
    frames: int = 0
    content_s: float = 0.0  # seconds of generated content (t_end of the last chunk)
    chunk_times_s: list[float] = field(default_factory=list)  # arrival time of every chunk
    model: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def rtf(self) -> float:
        """Real-time factor: content seconds per wall-clock second (> 1 is faster than real time)."""
        return self.content_s / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("chunk_times_s")
        return {**out, "fps": round(self.fps, 2), "rtf": round(self.rtf, 3)}


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key or os.environ.get("OMNIFORCING_API_KEY")
    return {"X-API-Key": key} if key else {}


def stream_http(
    url: str,
    prompt: str,
    seconds: int,
    seed: int = 0,
    api_key: str | None = None,
    timeout: float = 300.0,
) -> Iterator[Part]:
    """Framed parts of `POST {url}/v1/generate`, decoded as they arrive. A stream cut short (no
    "end"/"error" part: connection dropped, or silent for `timeout` s) raises `StreamBroken`."""
    body = {"prompt": prompt, "seconds": seconds, "seed": seed}
    with httpx.Client(timeout=timeout) as http:
        with http.stream(
            "POST", url.rstrip("/") + "/v1/generate", json=body, headers=_headers(api_key)
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                raise ClientError(resp.status_code, _json_or_text(resp))
            reader, last, done = PartReader(), None, False
            try:
                for piece in resp.iter_bytes():
                    for part in reader.feed(piece):
                        last = part.header.get("index") if part.type == "chunk" else last
                        done = part.type in ("end", "error")
                        yield part
            except httpx.TransportError as err:  # e.g. "incomplete chunked read", ReadTimeout
                raise StreamBroken(url, last, f"{type(err).__name__}: {err}") from err
            if not done:
                reason = f"the response ended early ({reader.pending} bytes of a part pending)"
                raise StreamBroken(url, last, reason)


def stream_ws(
    url: str,
    prompt: str,
    seconds: int,
    seed: int = 0,
    api_key: str | None = None,
    cancel_after: int | None = None,
    timeout: float = 300.0,
) -> Iterator[Part]:
    """Parts over `GET {url}/v1/stream`; sends {"type":"cancel"} after `cancel_after` chunks.
    A socket closed before the "end"/"error" part, or silent for `timeout` s, raises
    `StreamBroken` with its close code."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_url = url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
    with connect(
        ws_url + "/v1/stream",
        additional_headers=_headers(api_key),
        open_timeout=timeout,
        max_size=None,
    ) as ws:
        try:
            ws.send(json.dumps({"prompt": prompt, "seconds": seconds, "seed": seed}))
        except ConnectionClosed:  # refused before reading (e.g. API key): its error part follows
            pass
        n, last = 0, None
        while True:
            try:
                msg = ws.recv(timeout=timeout)
            except ConnectionClosed as err:  # before "end"/"error": the server side went away
                code = err.rcvd.code if err.rcvd is not None else 1006  # 1006: no close frame
                why = f": {err.rcvd.reason}" if err.rcvd is not None and err.rcvd.reason else ""
                reason = f"WebSocket closed with code {code}{why}"
                raise StreamBroken(url, last, reason, close_code=code) from err
            except TimeoutError:
                raise StreamBroken(url, last, f"no message for {timeout} s") from None
            part = decode_part(msg)
            yield part
            if part.type == "chunk":
                n, last = n + 1, part.header.get("index")
                if cancel_after is not None and n == cancel_after:
                    with contextlib.suppress(ConnectionClosed):
                        ws.send(json.dumps({"type": "cancel"}))
            if part.type in ("end", "error"):
                return


def save_stream(parts: Iterable[Part], out: str | os.PathLike | None) -> StreamStats:
    """Consume parts (writing an mp4 if `out`), measuring timing; raise on an error part."""
    stats, writer, t0 = StreamStats(), None, time.perf_counter()
    try:
        for part in parts:
            now = time.perf_counter() - t0
            if part.type == "start":
                stats.model = part.header.get("model", {})
            elif part.type == "error":
                err = part.header.get("error") or {}
                raise ClientError(int(err.get("status") or 500), err)
            elif part.type == "chunk":
                h = part.header
                if stats.chunks == 0:
                    stats.ttfc_s = now
                stats.chunks += 1
                stats.frames += part.frames.shape[0]
                stats.content_s = h["t_end"]
                stats.chunk_times_s.append(now)
                if out is not None:
                    if writer is None:
                        writer = Mp4Writer(out, h["fps"], h["sample_rate"], part.audio.shape[0])
                    writer.write(part.frames, part.audio)
            elif part.type == "end":
                stats.cancelled = bool(part.header.get("cancelled"))
        stats.elapsed_s = time.perf_counter() - t0
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return stats


def generate_local(
    model: str, prompt: str, seconds: int, seed: int = 0, device: str | None = None
) -> Iterator[Part]:
    """The same parts as the server sends, generated in this process (no server, no Ray)."""
    from deploy.models import load_model
    from deploy.protocol import encode_chunk

    loaded, t0 = load_model(model, device), time.perf_counter()
    yield Part({"type": "start", "model": loaded.info.to_json()})
    for chunk in loaded.new_generator().stream(prompt, seconds, seed):
        yield decode_part(encode_chunk(chunk, time.perf_counter() - t0))
    yield Part({"type": "end", "cancelled": False})


def _json_or_text(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text
