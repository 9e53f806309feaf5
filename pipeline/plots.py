"""Training plots as PNG files: the loss curve, fidelity against the teacher's reference line,
and a hook for a contact sheet of clip frames.

Holds pure rendering functions over plain Python/NumPy data (headless Agg backend). It does not
log to MLflow (`pipeline.tracking` does) and knows nothing about the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(
    series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = ""
) -> Path:
    """One line per metric name; log-scale y when every value is positive. Written atomically."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    positive = True
    for name, points in sorted(series.items()):
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=name, linewidth=1.2)
        positive &= min(values) > 0
    if positive and any(series.values()):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def fidelity_curve(
    series: dict[str, list[tuple[int, float]]],
    references: dict[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """Fidelity figures against step, one panel per figure; a figure's reference (the teacher's
    value on the same prompts and seeds) is a dashed horizontal line. Written atomically."""
    names = sorted(series)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(3.2 * max(1, len(names)), 3), dpi=100)
    for ax, name in zip(np.atleast_1d(axes), names, strict=False):
        points = series[name]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", linewidth=1.2, label="student")
        ref = references.get(name)
        if ref is not None and ref == ref:  # NaN: the teacher had no such figure
            ax.axhline(ref, color="0.3", linestyle="--", linewidth=1.0, label="teacher")
        ax.set_title(name.rsplit("/", 1)[-1], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title} fidelity".strip(), fontsize=10)
    return _save(fig, Path(path))


def contact_sheet(frames: np.ndarray, path: str | Path, cols: int = 8) -> Path:
    """frames uint8 [F, H, W, 3] → one grid image (hook for sample clips)."""
    f = frames.shape[0]
    rows = max(1, -(-f // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < f:
            ax.imshow(frames[i])
    return _save(fig, Path(path))


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: readers never see a half-written PNG
    return path


def sample_clip(frames: Any, audio: Any, fps: int, sample_rate: int, path: str | Path) -> Path:
    """A generated clip as a playable mp4 (H.264 + AAC) for MLflow, written atomically."""
    from data.mp4 import encode_mp4

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_mp4(np.asarray(frames), np.asarray(audio), fps, sample_rate))
    tmp.replace(path)
    return path
