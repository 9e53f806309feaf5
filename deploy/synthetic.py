"""A torch-free stand-in backend for `synthetic:` model URIs: a seeded moving ball (an
anti-aliased disc, like the world's) and a sine tone per block, so the protocol, page and client
can be exercised without weights, and a viewer's check (is there a ball?) has a known answer."""

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
    """Stand-in for `StreamingGenerator`: a seeded coloured ball of radius size/10.67 (6 px at
    64) on a dark background, moving 2 px a frame, and a tone; `delay` s per block."""

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
            frames = np.full((f1 - f0, self.size, self.size, 3), 10, np.uint8)  # [F, H, W, 3]
            for i, f in enumerate(range(f0, f1)):
                frames[i] = self._ball(frames[i], 8 + (f * 2) % (self.size - 16), colour)
            s0, s1 = (0, 640) if index == 0 else (640 + 16000 * (index - 1), 640 + 16000 * index)
            t = np.arange(s0, s1, dtype=np.float64) / 16000
            audio = (0.2 * np.sin(2 * math.pi * pitch * t)).astype(np.float32)[None]  # [1, S]
            t_start = 0.0 if index == 0 else f0 / 24
            yield SyntheticChunk(index, frames, audio, t_start, f1 / 24, time.perf_counter() - t0)

    def _ball(self, frame: np.ndarray, x: float, colour: np.ndarray) -> np.ndarray:
        """frame [H, W, 3] with a disc at (x, H/2): coverage clip(r + 0.5 − distance, 0, 1)."""
        r, n = self.size * 6 / 64, self.size
        yy, xx = np.mgrid[0:n, 0:n] + 0.5
        a = np.clip(r + 0.5 - np.hypot(xx - x, yy - n / 2), 0.0, 1.0)[..., None]
        return np.round(frame * (1 - a) + colour * a).astype(np.uint8)
