"""What a viewer sees of the ball (re-exported by `data.sync`): pixels only, pure numpy.

Per frame, the brightest foreground blob (excess over the frame's median background, max over
channels, as the tracker measures it): its peak contrast, whether it is visible at all, and its
radius from the area above half its peak. Real world clips: contrast ≈ 0.9, radius 4-6 px at 64,
visible in every frame. A dim smudge has low contrast and a large radius; an empty frame none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data.sync.video import _foreground

# A ball is "visible" when it stands this far above the background (51 of 255): a person spots
# it at once; the linear decode of a generated clip often stays below it.
VISIBLE_CONTRAST = 0.2
_WINDOW_AT_64 = 10  # px around the peak that belong to its blob (a large ball is 6 px)


def frame_appearance(fg: np.ndarray, window: int) -> tuple[float, float]:
    """One frame's foreground [H, W] → (peak contrast, radius px of the brightest blob): the
    radius is √(area/π) of the pixels at ≥ half the peak within `window` px of it."""
    i, j = np.unravel_index(int(np.argmax(fg)), fg.shape)
    peak = float(fg[i, j])
    if peak <= 0.0:
        return 0.0, 0.0
    win = fg[max(0, i - window) : i + window + 1, max(0, j - window) : j + window + 1]
    return peak, float(np.sqrt(np.count_nonzero(win >= 0.5 * peak) / np.pi))


def appearance(frames: np.ndarray) -> dict[str, float]:
    """frames uint8 [F, H, W, 3] → share of frames with a visible ball, median peak contrast
    (0-1, all frames), median radius in px (visible frames; NaN if none)."""
    _, fg = _foreground(frames)
    window = max(2, round(_WINDOW_AT_64 * min(fg.shape[1:]) / 64))
    per = np.array([frame_appearance(f, window) for f in fg])  # [F, 2]
    visible = per[:, 0] >= VISIBLE_CONTRAST
    return {
        "ball_visible_frac": float(visible.mean()),
        "ball_contrast": float(np.median(per[:, 0])),
        "ball_radius_px": float(np.median(per[visible, 1])) if visible.any() else float("nan"),
    }


def summarise_appearance(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over clips of `appearance` rows (NaN radii left out)."""
    out = {}
    for key in ("ball_visible_frac", "ball_contrast", "ball_radius_px"):
        vals = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out
