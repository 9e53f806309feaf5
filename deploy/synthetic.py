"""A torch-free stand-in backend for `synthetic:` model URIs: a seeded moving square and a sine
tone per block, so the protocol, page and client can be exercised without weights."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
