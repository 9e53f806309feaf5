"""The wire protocol of the serving app: request validation and the framing of streamed parts.

Requests (`POST /v1/generate` body, or the first text message of `GET /v1/stream`):
    {"prompt": str (1..MAX_PROMPT_CHARS after strip), "seconds": int (1..max_seconds),
     "seed": int (0..2**63-1, default 0)}; unknown fields, wrong types (no bool-as-int, no
    string-as-int) and malformed JSON are refused with a `RequestError` naming the field.

Framing (the same bytes over HTTP chunked transfer and, one part per binary message, WebSocket):
    part    = u32 big-endian header length H | H bytes of UTF-8 JSON header | payload
    payload = header["payload_bytes"] bytes; for "chunk" parts:
              frames uint8 [F, H, W, 3] row-major RGB, then audio float32 little-endian [C, S]
              (channel-major), with F, H, W and C, S given by header["frames"] / header["audio"].
Part types, in stream order:
    "start" {stream_id, model{name,version,alias,preset}, prompt, seconds, seed}      payload 0
    "chunk" {index, t_start, t_end, frames[4], audio[2], sample_rate, fps, latency_s, elapsed_s}
    "end"   {chunks, frames, elapsed_s, cancelled}                                      payload 0
    "error" {error{field, message}}                        payload 0 (the stream stops after it)
Chunk 0 is the Global Prefix (1 frame + 40 ms audio), chunk k >= 1 one second (24 frames).
WebSocket clients may send {"type": "cancel"} at any time; the server then ends the stream.

Holds no networking and no model code: pure bytes <-> numpy, so it is unit-testable alone.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

MEDIA_TYPE = "application/x-omniforcing-stream"
MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 16 * 1024
MAX_HEADER_BYTES = 64 * 1024
_LEN = struct.Struct(">I")
_FIELDS = {"prompt", "seconds", "seed"}


class RequestError(ValueError):
    """A client error: HTTP `status`, the offending `field` (or None) and a readable message."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field, self.message = status, field, message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message, "status": self.status}}


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    seconds: int
    seed: int = 0


def _strict_int(obj: dict[str, Any], name: str, lo: int, hi: int, default: int | None) -> int:
    if name not in obj:
        if default is None:
            raise RequestError(422, name, "field is required")
        return default
    value = obj[name]
    # bool is a subclass of int in Python; a JSON `true` is not a number of seconds.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(422, name, f"must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise RequestError(422, name, f"must be a whole number, got {value}")
        value = int(value)
    if not lo <= value <= hi:
        raise RequestError(422, name, f"must be in [{lo}, {hi}], got {value}")
    return value


def parse_request(
    raw: bytes | str, max_seconds: int, max_body: int = MAX_BODY_BYTES
) -> GenerateRequest:
    """Validate a request body; raise `RequestError` (400/413/422) naming what is wrong."""
    if len(raw) > max_body:
        raise RequestError(413, None, f"body of {len(raw)} bytes exceeds {max_body} bytes")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, None, f"malformed JSON: {err}") from None
    if not isinstance(obj, dict):
        raise RequestError(400, None, f"body must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field (allowed: {sorted(_FIELDS)})")
    prompt = obj.get("prompt")
    if prompt is None:
        raise RequestError(422, "prompt", "field is required")
    if not isinstance(prompt, str):
        raise RequestError(422, "prompt", f"must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise RequestError(422, "prompt", "must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(422, "prompt", f"is {len(prompt)} chars, limit {MAX_PROMPT_CHARS}")
    seconds = _strict_int(obj, "seconds", 1, max_seconds, None)
    seed = _strict_int(obj, "seed", 0, 2**63 - 1, 0)
    return GenerateRequest(prompt=prompt, seconds=seconds, seed=seed)


def _to_numpy(x: Any, dtype: type) -> np.ndarray:
    # Chunks come from the model as torch tensors (maybe on a GPU) or, in tests, numpy arrays.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def encode_part(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One framed part: length-prefixed JSON header (with payload_bytes filled in) + payload."""
    head = json.dumps({**header, "payload_bytes": len(payload)}, separators=(",", ":")).encode()
    return _LEN.pack(len(head)) + head + payload


def encode_chunk(chunk: Any, elapsed_s: float) -> bytes:
    """Frame a model `Chunk` (frames uint8 [F,H,W,3], audio float32 [C,S]) as a "chunk" part."""
    frames = _to_numpy(chunk.frames, np.uint8)  # [F, H, W, 3]
    audio = _to_numpy(chunk.audio, np.dtype("<f4"))  # [C, S]
    if frames.ndim != 4 or frames.shape[-1] != 3 or audio.ndim != 2:
        raise ValueError(f"bad chunk shapes frames {frames.shape} audio {audio.shape}")
    header = {
        "type": "chunk",
        "index": int(chunk.index),
        "t_start": float(chunk.t_start),
        "t_end": float(chunk.t_end),
        "frames": list(frames.shape),
        "audio": list(audio.shape),
        "sample_rate": int(chunk.sample_rate),
        "fps": float(chunk.fps),
        "latency_s": float(chunk.latency_s),
        "elapsed_s": float(elapsed_s),
    }
    return encode_part(header, frames.tobytes() + audio.tobytes())


@dataclass
class Part:
    header: dict[str, Any]
    frames: np.ndarray | None = None  # uint8 [F, H, W, 3] for "chunk" parts
    audio: np.ndarray | None = None  # float32 [C, S] for "chunk" parts

    @property
    def type(self) -> str:
        return str(self.header.get("type"))


def decode_part(data: bytes) -> Part:
    """Decode exactly one framed part (a WebSocket message); raise ValueError if malformed."""
    reader = PartReader()
    parts = list(reader.feed(data))
    if len(parts) != 1 or reader.pending:
        raise ValueError(f"expected one whole part, got {len(parts)} and {reader.pending} extra")
    return parts[0]


class PartReader:
    """Incremental decoder: feed arbitrary byte slices, get whole `Part`s back in order."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Part]:
        self._buf += data
        while len(self._buf) >= _LEN.size:
            (hlen,) = _LEN.unpack_from(self._buf)
            if hlen > MAX_HEADER_BYTES:
                raise ValueError(f"part header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
            if len(self._buf) < _LEN.size + hlen:
                return
            header = json.loads(bytes(self._buf[_LEN.size : _LEN.size + hlen]))
            start = _LEN.size + hlen
            end = start + int(header.get("payload_bytes", 0))
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[start:end])
            del self._buf[:end]
            yield _make_part(header, payload)


def _make_part(header: dict[str, Any], payload: bytes) -> Part:
    if header.get("type") != "chunk":
        return Part(header)
    f_shape, a_shape = tuple(header["frames"]), tuple(header["audio"])
    n_frames = int(np.prod(f_shape))
    if len(payload) != n_frames + 4 * int(np.prod(a_shape)):
        raise ValueError(f"chunk {header.get('index')}: payload size does not match shapes")
    frames = np.frombuffer(payload, np.uint8, n_frames).reshape(f_shape)
    audio = np.frombuffer(payload, np.dtype("<f4"), offset=n_frames).reshape(a_shape)
    return Part(header, frames, audio.astype(np.float32))
