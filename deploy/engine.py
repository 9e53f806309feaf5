"""The serving engine: admits streams, runs generation in threads, frees caches.

One `Engine` lives in each Serve replica. Each stream gets its own `StreamingGenerator` (so its KV
cache belongs to that stream alone) driven in a worker thread off the event loop; parts are handed
to the event loop through an asyncio queue. Cancelling (client disconnect, WebSocket cancel)
stops the thread at the next block boundary and closes the generator, which drops its cache.
Loading a model URI lives in deploy/models.py. This file knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from deploy.models import LoadedModel
from deploy.protocol import GenerateRequest, encode_chunk, encode_part

__all__ = ["Engine", "Overloaded"]


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
