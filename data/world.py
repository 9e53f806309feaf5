"""The synthetic audio-visual world: bouncing balls that ping when they touch a wall.

Holds `render_clip` (frames, audio, ground-truth meta), the named palette / sizes / pitches, the
caption grammar (`caption_vocabulary`, `parse_caption`) and the analytic contact solver.
Deliberately does NOT hold any measurement (that is `data.sync`), any codec (`model.codecs`) or
any file writing (shards live elsewhere). Pure numpy; same seed -> bit-identical clip.

Conventions: pixel coordinates are continuous, x right in [0, W], y down in [0, H]; pixel (i, j)
has its centre at (j + 0.5, i + 0.5). Frame f is shown at time f / fps; audio sample n sounds at
n / sample_rate. Balls pass through each other: only wall contacts are events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Named palette (linear RGB in [0, 1]); distinct chroma directions so colour stays decidable
# after blurring. Background is a dark grey so "ball present" is a brightness test.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.15),
}
BACKGROUND = 0.04
# Radius as a fraction of min(H, W): 4 px / 6 px at 64x64, 2 px / 3 px at 32x32.
SIZES: dict[str, float] = {"small": 4.0 / 64.0, "large": 6.0 / 64.0}
# Pitches sit at the geometric centres of the audio codec's bands (150-3000 Hz, 8 bands).
PITCHES: dict[str, float] = {"low": 262.0, "mid": 554.0, "high": 1175.0, "very high": 2490.0}
DIRECTIONS = ("up-left", "up-right", "down-left", "down-right")

SPEED_RANGE = (40.0, 75.0)  # px/s at 64 px (scaled with min(H, W))
ANGLE_RANGE = (20.0, 70.0)  # degrees from horizontal, so both axes bounce
BURST_SECONDS = 0.030
BURST_ATTACK = 0.001
BURST_TAU = 0.008
BURST_AMPLITUDE = 0.45


@dataclass
class Clip:
    """One rendered clip: frames uint8 [F, H, W, 3], audio float32 [1, S], meta (JSON-able)."""

    frames: np.ndarray
    audio: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def frame_count(seconds: float, fps: int) -> int:
    """F = round(seconds * fps); must be 1 + 8m (LTX-2 video codec geometry)."""
    n = int(round(seconds * fps))
    if n < 1 or (n - 1) % 8 != 0:
        raise ValueError(
            f"seconds={seconds} at fps={fps} gives {n} frames; expected 1 + 8k frames "
            f"(e.g. seconds = k + 1/{fps}, like 5.04 s -> 121 frames)"
        )
    return n


def sample_count(frames: int, fps: int, sample_rate: int) -> int:
    """Audio covers the video span plus one 40 ms codec window: 121 frames -> 80640 samples."""
    return int(round(((frames - 1) / fps + 1.0 / 25.0) * sample_rate))


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (for the word-level text encoder)."""
    words = {"a", "ball", "moving", "with", "ping", "and"}
    words |= set(COLOURS) | set(SIZES) | set(DIRECTIONS)
    for name in PITCHES:
        words |= set(name.split())
    return sorted(words)


def describe_ball(ball: dict[str, Any]) -> str:
    """'a small red ball moving up-left with a high ping'."""
    return (
        f"a {ball['size']} {ball['colour']} ball moving {ball['direction']} "
        f"with a {ball['pitch']} ping"
    )


def parse_caption(caption: str) -> list[dict[str, str]]:
    """Inverse of the caption grammar: one dict (size, colour, direction, pitch) per ball.

    Raises ValueError naming the offending part when the text is not a world caption.
    """
    out = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if len(words) < 9 or words[:1] != ["a"] or words[3:5] != ["ball", "moving"]:
            raise ValueError(f"caption part {part!r} does not match 'a <size> <colour> ball ...'")
        size, colour, direction = words[1], words[2], words[5]
        pitch = " ".join(words[8:-1])
        if size not in SIZES or colour not in COLOURS or direction not in DIRECTIONS:
            raise ValueError(f"caption part {part!r}: unknown size/colour/direction")
        if pitch not in PITCHES or words[-1] != "ping":
            raise ValueError(f"caption part {part!r}: unknown pitch {pitch!r}")
        out.append({"size": size, "colour": colour, "direction": direction, "pitch": pitch})
    return out


def _fold(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect an unfolded coordinate into [lo, hi] (triangle wave): elastic walls."""
    span = hi - lo
    return lo + span - np.abs(np.mod(u - lo, 2.0 * span) - span)


def _axis_contacts(p0: float, v: float, lo: float, hi: float, t_end: float) -> list[tuple]:
    """Exact contact times in (0, t_end) for one axis; the unfolded path hits lo + n*span."""
    span = hi - lo
    if v == 0.0:
        return []
    n_lo = math.floor((p0 - lo) / span) + (1 if v > 0 else 0)
    out = []
    n = n_lo
    step = 1 if v > 0 else -1
    while True:
        t = (lo + n * span - p0) / v
        if t >= t_end:
            break
        if t > 0.0:
            out.append((t, "lo" if n % 2 == 0 else "hi"))
        n += step
    return out


def _sample_balls(rng: np.random.Generator, n_balls: int, height: int, width: int) -> list[dict]:
    """Draw colour/size/pitch (distinct across balls), start position and velocity."""
    scale = min(height, width) / 64.0
    colours = rng.permutation(list(COLOURS))[:n_balls]
    pitches = rng.permutation(list(PITCHES))[:n_balls]
    balls = []
    for i in range(n_balls):
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        radius = SIZES[size] * min(height, width)
        speed = float(rng.uniform(*SPEED_RANGE)) * scale
        theta = float(rng.uniform(*ANGLE_RANGE))
        sx = 1 if rng.random() < 0.5 else -1  # +1: moving right
        sy = 1 if rng.random() < 0.5 else -1  # +1: moving up (image y decreases)
        rad = math.radians(theta)
        vx, vy_img = sx * speed * math.cos(rad), -sy * speed * math.sin(rad)
        # angle: degrees counter-clockwise from +x with y pointing UP (math convention).
        angle = math.degrees(math.atan2(sy * math.sin(rad), sx * math.cos(rad)))
        direction = ("up" if sy > 0 else "down") + "-" + ("right" if sx > 0 else "left")
        balls.append(
            {
                "colour": str(colours[i]),
                "size": size,
                "pitch": str(pitches[i]),
                "pitch_hz": PITCHES[str(pitches[i])],
                "radius": radius,
                "speed": speed,
                "angle": angle,
                "direction": direction,
                "x0": float(rng.uniform(radius, width - radius)),
                "y0": float(rng.uniform(radius, height - radius)),
                "vx": vx,
                "vy": vy_img,
            }
        )
    return balls


def _trajectory(ball: dict, t: np.ndarray, height: int, width: int) -> tuple:
    r = ball["radius"]
    x = _fold(ball["x0"] + ball["vx"] * t, r, width - r)
    y = _fold(ball["y0"] + ball["vy"] * t, r, height - r)
    return x, y


def _contacts(balls: list[dict], height: int, width: int, t_end: float) -> list[dict]:
    events = []
    for b, ball in enumerate(balls):
        r = ball["radius"]
        for t, side in _axis_contacts(ball["x0"], ball["vx"], r, width - r, t_end):
            events.append({"time": t, "ball": b, "wall": "left" if side == "lo" else "right"})
        for t, side in _axis_contacts(ball["y0"], ball["vy"], r, height - r, t_end):
            events.append({"time": t, "ball": b, "wall": "top" if side == "lo" else "bottom"})
    return sorted(events, key=lambda e: (e["time"], e["ball"]))


def _draw(balls: list[dict], n_frames: int, fps: int, height: int, width: int) -> np.ndarray:
    """Anti-aliased discs: coverage = clip(r + 0.5 - distance to pixel centre, 0, 1)."""
    t = np.arange(n_frames) / fps
    img = np.full((n_frames, height, width, 3), BACKGROUND, dtype=np.float32)
    yy = (np.arange(height) + 0.5)[None, :, None]  # [1, H, 1]
    xx = (np.arange(width) + 0.5)[None, None, :]  # [1, 1, W]
    for ball in balls:
        x, y = _trajectory(ball, t, height, width)  # [F] each
        d = np.sqrt((xx - x[:, None, None]) ** 2 + (yy - y[:, None, None]) ** 2)  # [F, H, W]
        alpha = np.clip(ball["radius"] + 0.5 - d, 0.0, 1.0)[..., None].astype(np.float32)
        img = img * (1.0 - alpha) + alpha * np.asarray(COLOURS[ball["colour"]], np.float32)
    return np.round(img * 255.0).astype(np.uint8)


def _sound(events: list[dict], balls: list[dict], n_samples: int, sample_rate: int) -> np.ndarray:
    """Each contact: 1 ms linear attack, exp decay (tau 8 ms), cut at 30 ms; sub-sample onset."""
    audio = np.zeros(n_samples, dtype=np.float64)
    length = int(math.ceil(BURST_SECONDS * sample_rate)) + 1
    for ev in events:
        start = int(math.floor(ev["time"] * sample_rate))
        idx = np.arange(start, min(start + length + 1, n_samples))
        tau = idx / sample_rate - ev["time"]  # seconds since the exact contact
        env = np.where(
            tau < BURST_ATTACK,
            np.clip(tau / BURST_ATTACK, 0.0, 1.0),
            np.exp(-(tau - BURST_ATTACK) / BURST_TAU),
        )
        env = np.where((tau >= 0.0) & (tau <= BURST_SECONDS), env, 0.0)
        freq = balls[ev["ball"]]["pitch_hz"]
        audio[idx] += BURST_AMPLITUDE * env * np.sin(2.0 * math.pi * freq * np.maximum(tau, 0.0))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)[None, :]


def render_clip(
    seed: int,
    seconds: float = 5.04,
    height: int = 64,
    width: int = 64,
    fps: int = 24,
    sample_rate: int = 16000,
    max_balls: int = 2,
    n_balls: int | None = None,
) -> Clip:
    """Render one deterministic clip of 1..max_balls balls (or exactly `n_balls`).

    frames uint8 [F, H, W, 3] with F = round(seconds * fps) = 1 + 8m; audio float32 [1, S] with
    S = ((F - 1) / fps + 0.04) * sample_rate (80640 for 121 frames at 16 kHz).
    """
    n_frames = frame_count(seconds, fps)
    if height < 8 or width < 8:
        raise ValueError(f"height={height}, width={width}: both must be at least 8 px")
    if n_balls is None:
        if max_balls < 1:
            raise ValueError(f"max_balls={max_balls}: must be at least 1")
    elif not 1 <= n_balls <= len(COLOURS):
        raise ValueError(f"n_balls={n_balls}: must be in 1..{len(COLOURS)}")
    rng = np.random.default_rng(seed)
    count = n_balls if n_balls is not None else int(rng.integers(1, max_balls + 1))
    balls = _sample_balls(rng, count, height, width)
    n_samples = sample_count(n_frames, fps, sample_rate)
    events = _contacts(balls, height, width, n_samples / sample_rate)
    frames = _draw(balls, n_frames, fps, height, width)
    audio = _sound(events, balls, n_samples, sample_rate)
    meta = {
        "caption": " and ".join(describe_ball(b) for b in balls),
        "fps": fps,
        "sample_rate": sample_rate,
        "seconds": seconds,
        "width": width,
        "height": height,
        "seed": seed,
        "events": events,
        "balls": balls,
    }
    return Clip(frames=frames, audio=audio, meta=meta)
