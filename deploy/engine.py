"""The serving engine: loads a model, admits streams, runs generation in threads, frees caches.

One `Engine` lives in each Serve replica. Each stream gets its own `StreamingGenerator` (so its KV
cache belongs to that stream alone) driven in a worker thread off the event loop; parts are handed
to the event loop through an asyncio queue. Cancelling (client disconnect, WebSocket cancel)
stops the thread at the next block boundary and closes the generator, which drops its cache.

A `synthetic:` model URI gives a torch-free stand-in backend (moving square + sine tone) so the
protocol, page and client can be exercised without weights. This file knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.protocol import GenerateRequest, encode_chunk, encode_part


@dataclass(frozen=True)
class ModelInfo:
    uri: str
    name: str
    version: str
    alias: str | None
    preset: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SyntheticChunk:
    """Same fields as `model.Chunk`: frames uint8 [F,H,W,3], audio float32 [1,S]."""

    index: int
    frames: np.ndarray
    audio: np.ndarray
    t_start: float
    t_end: float
    latency_s: float
    sample_rate: int = 16000
    fps: float = 24.0


class SyntheticGenerator:
    """Stand-in for `StreamingGenerator`: a seeded coloured square and a tone, `delay` s/block."""

    def __init__(self, size: int = 64, delay: float = 0.02) -> None:
        self.size, self.delay = size, delay

    def stream(self, prompt: str, seconds: int, seed: int) -> Iterator[SyntheticChunk]:
        rng = np.random.default_rng(seed)
        colour = rng.integers(80, 256, size=3).astype(np.uint8)
        pitch = 220.0 + 20.0 * (len(prompt) % 20)
        bounds = [(0, 1)] + [(1 + 24 * (k - 1), 1 + 24 * k) for k in range(1, seconds + 1)]
        for index, (f0, f1) in enumerate(bounds):
            t0 = time.perf_counter()
            time.sleep(self.delay)
            frames = np.zeros((f1 - f0, self.size, self.size, 3), np.uint8)  # [F, H, W, 3]
            for i, f in enumerate(range(f0, f1)):
                x = int((f * 2) % (self.size - 16))
                frames[i, 24:40, x : x + 16] = colour
            s0, s1 = (0, 640) if index == 0 else (640 + 16000 * (index - 1), 640 + 16000 * index)
            t = np.arange(s0, s1, dtype=np.float64) / 16000
            audio = (0.2 * np.sin(2 * math.pi * pitch * t)).astype(np.float32)[None]  # [1, S]
            t_start = 0.0 if index == 0 else f0 / 24
            yield SyntheticChunk(index, frames, audio, t_start, f1 / 24, time.perf_counter() - t0)


@dataclass
class LoadedModel:
    info: ModelInfo
    new_generator: Callable[[], Any]  # -> object with .stream(prompt, seconds, seed)


def load_model(uri: str, device: str | None = None) -> LoadedModel:
    """Load `models:/name@alias`, a local bundle dir or `synthetic:` into a generator factory."""
    if uri.startswith("synthetic:"):
        delay = float(uri.split(":", 1)[1] or 0.02)
        info = ModelInfo(uri, "synthetic", "0", None, "synthetic")
        return LoadedModel(info, lambda: SyntheticGenerator(delay=delay))
    bundle, info = _load_bundle(uri)
    StreamingGenerator = _model_api()
    # Place the weights once here (a GPU when the replica has one), not once per stream.
    bundle.to(_pick_device(device))
    return LoadedModel(info, lambda: StreamingGenerator(bundle))


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_api() -> Any:
    """StreamingGenerator, imported late: torch is needed only for a real model."""
    try:
        from model import StreamingGenerator
    except ImportError:  # model/__init__ not exporting it yet: use the defining module
        from model.streaming import StreamingGenerator
    return StreamingGenerator


def _load_bundle(uri: str) -> tuple[Any, ModelInfo]:
    """Bundle + what it is. An alias is resolved to a version first and that version is loaded,
    so the reported version is the one served even if the alias moves meanwhile."""
    from pipeline.registry import load_bundle

    if uri.startswith("models:/"):
        name, _, alias = uri[len("models:/") :].partition("@")
        name, _, version = name.partition("/")
        if not name or not (alias or version):
            raise ValueError(f"--model {uri!r}: expected models:/<name>@<alias> or /<version>")
        if alias:
            version = _registry_version(name, alias)
        bundle = load_bundle(f"models:/{name}/{version}")
        return bundle, ModelInfo(uri, name, version, alias or None, _preset(bundle))
    if "://" in uri or ":/" in uri:  # runs:/…, s3://… : whatever the registry loader takes
        bundle = load_bundle(uri)
        return bundle, ModelInfo(uri, uri, "unversioned", None, _preset(bundle))
    path = Path(uri)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {uri!r}: not a bundle directory or a models:/ URI")
    bundle = load_bundle(str(path))
    return bundle, ModelInfo(uri, path.name, _dir_version(path), None, _preset(bundle))


def _dir_version(path: Path) -> str:
    # A local bundle has no registry version: use a content hash of its small files.
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*.json")):
        digest.update(f.read_bytes())
    return "sha256:" + digest.hexdigest()[:12]


def _registry_version(name: str, alias: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def _preset(bundle: Any) -> str | None:
    return getattr(getattr(bundle, "config", None), "name", None)  # ModelConfig.name: the preset


class Overloaded(RuntimeError):
    """Every stream slot of this replica is taken."""


class Engine:
    """Per-replica stream admission, generation threads and session accounting."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_streams: int,
        start_timeout_s: float = 30.0,
        max_ahead: int = 4,
    ) -> None:
        self.model = loaded
        self.max_streams = max_streams
        self._pool = ThreadPoolExecutor(max_streams, thread_name_prefix="omniforcing-gen")
        self._lock = threading.Lock()
        # stream id -> admission time until its stream starts, then None. A slot whose stream never
        # starts (client gone between the 200 headers and the first body read) is reclaimed after
        # start_timeout_s, so it cannot leak.
        self._active: dict[str, float | None] = {}
        self.start_timeout_s = start_timeout_s
        self.max_ahead = max_ahead  # chunks generated but not yet taken by the client
        self._live: weakref.WeakSet = weakref.WeakSet()  # generator iterators (own KV caches)

    def stats(self) -> dict[str, int]:
        return {
            "active_streams": len(self._active),
            "live_generators": len(self._live),
            "max_streams": self.max_streams,
        }

    def admit(self) -> str:
        """Reserve a slot or raise `Overloaded`; the slot is freed when its thread ends."""
        with self._lock:
            now = time.monotonic()
            for old, t in list(self._active.items()):
                if t is not None and now - t > self.start_timeout_s:
                    del self._active[old]
            if len(self._active) >= self.max_streams:
                raise Overloaded(f"{len(self._active)} of {self.max_streams} streams running")
            sid = uuid.uuid4().hex[:12]
            self._active[sid] = now
            return sid

    def release(self, sid: str) -> None:
        with self._lock:
            self._active.pop(sid, None)

    async def stream(
        self, sid: str, req: GenerateRequest, cancel: asyncio.Event | None = None
    ) -> AsyncIterator[bytes]:
        """Framed parts for one admitted stream: start, one chunk per block, end (or error)."""
        loaded, loop, queue = self.model, asyncio.get_running_loop(), asyncio.Queue()
        stop, started = threading.Event(), time.perf_counter()
        cancel = cancel or asyncio.Event()

        def put(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop already closed: nobody is listening any more
                pass

        with self._lock:
            if sid in self._active:
                self._active[sid] = None  # started: from now on only its worker releases it
        submitted = False
        try:
            head = {"type": "start", "stream_id": sid, "model": loaded.info.to_json()}
            yield encode_part({**head, **asdict(req)})
            credits = threading.Semaphore(self.max_ahead)
            work = (sid, loaded, req, put, stop, credits, started)
            loop.run_in_executor(self._pool, self._work, *work)
            submitted = True
            async for kind, item in _drain(queue, cancel):
                if kind == "chunk":
                    yield item
                    credits.release()
                elif kind == "error":
                    yield encode_part({"type": "error", "error": {"field": None, "message": item}})
                    return
                else:  # "end" (item = chunk count) or "cancel"
                    n = item if kind == "end" else None
                    tail = {"chunks": n, "elapsed_s": time.perf_counter() - started}
                    yield encode_part({"type": "end", "cancelled": kind == "cancel", **tail})
                    return
        finally:
            stop.set()  # the worker sees this at the next block boundary and frees the cache
            if not submitted:  # client gone right after the start part: no worker to release
                self.release(sid)

    def _work(self, sid, loaded, req, put, stop, credits, started) -> None:
        it = None
        try:
            it = loaded.new_generator().stream(req.prompt, req.seconds, req.seed)
            self._live.add(it)
            n = 0
            while True:
                # Backpressure: at most `max_ahead` encoded chunks wait for a slow client.
                while not credits.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                chunk = next(it, None)
                if chunk is None or stop.is_set():
                    break
                put(("chunk", encode_chunk(chunk, time.perf_counter() - started)))
                n += 1
            put(("end", n))
        except Exception as err:  # noqa: BLE001 — reported to the client as an error part
            put(("error", f"{type(err).__name__}: {err}"))
        finally:
            if it is not None:
                it.close()  # runs the generator's cleanup; its frame (and KV cache) is dropped
            del it
            self.release(sid)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _drain(queue: asyncio.Queue, cancel: asyncio.Event) -> AsyncIterator[tuple[str, Any]]:
    """Items from `queue` until `cancel` is set (then one ("cancel", None))."""
    cancelled = asyncio.ensure_future(cancel.wait())
    try:
        while True:
            got = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({got, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if got in done:
                yield got.result()
                continue
            got.cancel()
            yield ("cancel", None)
            return
    finally:
        cancelled.cancel()
