"""Video side of the sync measurement (re-exported by `data.sync`): pixels only, pure numpy.

Blob tracking with colour-separated tracks, direction reversals refined to sub-frame times (a
reversal at a wall is a visible contact; one in open space is a motion error of a generated clip),
motion statistics and the dominant palette colour of a clip of the world.
Frame f is at time f / fps (data.world's convention).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.world import COLOURS

COS_POWER = 8
TRACK_RADIUS = 1.0
# A ball (radius 4 or 6 px at 64) touches a wall when its centre is one radius from the edge; 12 px
# (two large radii) leaves room for blur and the sub-frame apex. Real clips reverse only here.
WALL_PX_AT_64 = 12.0


def _foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frames uint8 [F,H,W,3] -> (excess over per-frame median background [F,H,W,3], its max
    over channels [F,H,W]); max-channel brightness treats all palette colours alike."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    x = frames.astype(np.float32) / 255.0
    # Balls cover a few % of pixels, so the median of every 3rd pixel is the background.
    bg = np.median(x.reshape(x.shape[0], -1, 3)[:, ::3], axis=1)[:, None, None, :]  # [F,1,1,3]
    excess = np.clip(x - bg, 0.0, None)
    return excess, excess.max(-1)


def _find_blobs(
    fg: np.ndarray, radius: int, max_blobs: int, floor: float
) -> list[tuple[float, float, float]]:
    """Peaks of one frame's foreground [H, W] above `floor`: (x, y, peak) via argmax and the
    centroid of (fg - peak / 4) in a (2 radius + 1)^2 window; each found window is then masked."""
    h, w = fg.shape
    work = fg.copy()
    yy, xx = np.mgrid[0:h, 0:w]
    blobs: list[tuple[float, float, float]] = []
    for _ in range(max_blobs):
        i, j = np.unravel_index(int(np.argmax(work)), work.shape)
        peak = float(work[i, j])
        if peak < floor or (blobs and peak < 0.35 * blobs[0][2]):
            break
        win = (np.abs(yy - i) <= radius) & (np.abs(xx - j) <= radius)
        wts = np.where(win, np.clip(work - 0.25 * peak, 0.0, None), 0.0)
        s = wts.sum()
        blobs.append(
            (float((wts * (xx + 0.5)).sum() / s), float((wts * (yy + 0.5)).sum() / s), peak)
        )
        work[win] = 0.0
    return blobs


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-9)


def _track_colours(excess: np.ndarray, fg: np.ndarray, k: int) -> np.ndarray | None:
    """k chroma directions [k, 3] by 2-means over bright pixels, or None if not distinct."""
    mask = fg > 0.5 * np.percentile(fg.max((1, 2)), 90)
    px = _unit(excess[mask])  # [N, 3]
    if len(px) < 2 * k:
        return None
    centres = [px[int(np.argmax(fg[mask]))]]
    while len(centres) < k:  # farthest-point init, then a few Lloyd steps
        centres.append(px[int(np.argmin(np.max(px @ np.array(centres).T, axis=1)))])
    c = np.array(centres)
    for _ in range(10):
        lab = (px @ c.T).argmax(1)
        c = np.array([_unit(px[lab == j].mean(0)) if np.any(lab == j) else c[j] for j in range(k)])
    return c if float(c[0] @ c[1]) < 0.97 else None


def track_blobs(frames: np.ndarray, max_balls: int = 2) -> np.ndarray:
    """Track up to `max_balls` bright blobs -> positions [T, F, 2] (x, y in pixels).

    A second track exists only if a second blob is seen in most frames. With distinct colours
    each track follows its own colour-weighted foreground (fg * cos^8 to the track's chroma), so
    crossing balls do not swap; otherwise one blob per frame on the plain foreground. Frames with
    no blob repeat the previous position.
    """
    excess, fg = _foreground(frames)
    n, h, w = fg.shape
    radius = max(3, int(round(0.3 * min(h, w))))
    # Decoded (blurred) blobs peak at ~0.1 above background, sharp ones near 1: relative floor.
    floor = max(0.02, 0.3 * float(np.percentile(fg.max((1, 2)), 90)))
    counts = [len(_find_blobs(fg[f], radius, max_balls, floor)) for f in range(n)]
    n_tracks = 1 + sum(int(np.mean([c > k for c in counts]) > 0.6) for k in range(1, max_balls))
    colours = _track_colours(excess, fg, n_tracks) if n_tracks > 1 else None
    if colours is None:
        n_tracks, maps = 1, fg[None]
    else:
        cos = np.clip(_unit(excess) @ colours.T, 0.0, None)  # [F, H, W, T]
        maps = np.moveaxis(fg[..., None] * cos**COS_POWER, -1, 0)  # [T, F, H, W]
    pos = np.zeros((n_tracks, n, 2))
    for t in range(n_tracks):
        last = np.array([w / 2, h / 2])
        for f in range(n):
            blobs = _find_blobs(maps[t, f], int(TRACK_RADIUS * radius), 1, 0.5 * floor)
            last = np.array(blobs[0][:2]) if blobs else last
            pos[t, f] = last
    return pos


def _turns(x: np.ndarray, delta: float) -> list[int]:
    """Indices of direction reversals of a 1-D track, with hysteresis `delta` (pixels)."""
    turns, direction, lo, hi, ext = [], 0, 0, 0, 0
    for i in range(1, len(x)):
        if direction == 0:
            lo = i if x[i] < x[lo] else lo
            hi = i if x[i] > x[hi] else hi
            if x[i] - x[lo] > delta:
                direction, ext = 1, i
            elif x[hi] - x[i] > delta:
                direction, ext = -1, i
        elif direction * (x[i] - x[ext]) >= 0:
            ext = i
        elif direction * (x[ext] - x[i]) > delta:
            turns.append(ext)
            direction, ext = -direction, i
    return turns


def _refine(x: np.ndarray, e: int, side: int = 6) -> float:
    """Sub-frame apex: intersect lines fitted to frames e-6..e-1 and e+1..e+6 (V-shaped path).

    Six frames a side average out the 8-frame group steps of decoded video; a wall contact on
    the same axis is >= ~0.7 s (17 frames) away, so each side stays on one straight leg."""
    left = np.arange(max(0, e - side), e)
    right = np.arange(e + 1, min(len(x), e + 1 + side))
    if len(left) < 2 or len(right) < 2:
        return float(e)
    b1, a1 = np.polyfit(left, x[left], 1)
    b2, a2 = np.polyfit(right, x[right], 1)
    if abs(b1 - b2) < 1e-9:
        return float(e)
    return float(np.clip((a2 - a1) / (b1 - b2), e - 2.0, e + 2.0))


def analyse_motion(frames: np.ndarray, fps: float, max_balls: int = 2) -> dict[str, Any]:
    """Tracks, contact times (s), per-contact wall distance (px) and mean speed (px/s)."""
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    pos = track_blobs(frames, max_balls)  # [T, F, 2]
    delta = max(h, w) / 64.0
    times, wall_dist = [], []
    for track in pos:
        for axis, size in ((0, w), (1, h)):
            x = track[:, axis]
            for e in _turns(x, delta):
                times.append(_refine(x, e) / fps)
                wall_dist.append(min(x[e], size - x[e]))
    order = np.argsort(times)
    speed = np.linalg.norm(np.diff(pos, axis=1), axis=-1).mean() * fps if pos.shape[1] > 1 else 0.0
    return {
        "tracks": pos,
        "contacts": [float(times[i]) for i in order],
        "wall_dist": [float(wall_dist[i]) for i in order],
        "speed_px_s": float(speed),
    }


def detect_contacts(frames: np.ndarray, fps: float, max_balls: int = 2) -> list[float]:
    """Times (s) of ball direction reversals seen in uint8 frames [F,H,W,3]; in a real clip
    each is a wall contact (`data.sync.wall_contacts` keeps those of a generated one)."""
    return analyse_motion(frames, fps, max_balls)["contacts"]


def wall_px(frames: np.ndarray) -> float:
    """How near a wall (px, track centre to frame edge) a reversal must be to be a wall contact."""
    return WALL_PX_AT_64 * min(np.asarray(frames).shape[1:3]) / 64.0


def motion_stats(frames: np.ndarray, fps: float, max_balls: int = 2) -> dict[str, float]:
    """Reversals per clip, mean blob speed (px/s), share of reversals at a wall (`wall_px`)."""
    m = analyse_motion(frames, fps, max_balls)
    wd = np.asarray(m["wall_dist"])
    return {
        "reversals": float(len(m["contacts"])),
        "speed_px_s": m["speed_px_s"],
        "wall_frac": float(np.mean(wd <= wall_px(frames))) if len(wd) else float("nan"),
        "n_tracks": float(m["tracks"].shape[0]),
    }


def dominant_colour(frames: np.ndarray) -> str:
    """Palette name most foreground pixels (weighted by brightness) are closest to in chroma."""
    excess, fg = _foreground(frames)
    names = list(COLOURS)
    pal = np.array([COLOURS[k] for k in names])
    pal = pal / np.linalg.norm(pal, axis=1, keepdims=True)  # [K, 3]
    mask = fg > 0.3 * max(float(fg.max()), 1e-6)
    px = excess[mask]  # [N, 3]
    if len(px) == 0:
        return names[0]
    cos = (px / (np.linalg.norm(px, axis=1, keepdims=True) + 1e-9)) @ pal.T  # [N, K]
    votes = np.bincount(cos.argmax(1), weights=fg[mask], minlength=len(names))
    return names[int(votes.argmax())]
