"""Looking at shards: dataset summary, contact sheet, codec fitting with round-trip quality.

Holds: `inspect_shards` (samples, total duration, fps / sample-rate histograms, bad samples by
kind, optional contact-sheet PNG), `contact_sheet` (frames in a grid with each clip's waveform
under them; matplotlib Agg, written atomically) and `fit_codec` (fits model.codecs on the shards,
saves them, reports video PSNR and how many ground-truth contacts stay detectable, via data.sync,
in the decoded video and audio within 40 ms, before and after the codec round trip).

Deliberately not here: command-line parsing and printing (data/cli.py), reading (data/reader.py).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from data.mp4 import DecodeSpec
from data.reader import BadSampleCounter, Sample, iter_samples

TOLERANCE_S = 0.040


def contact_sheet(samples: list[Sample], out_png: str, columns: int = 8) -> None:
    """One block per clip: `columns` evenly spaced frames, the waveform under them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("contact sheet needs at least one sample")
    fig = plt.figure(figsize=(columns * 1.2, len(samples) * 1.9))
    grid = fig.add_gridspec(2 * len(samples), columns, height_ratios=[2, 1] * len(samples))
    for row, s in enumerate(samples):
        picks = np.linspace(0, len(s.frames) - 1, columns).round().astype(int)
        for col, f in enumerate(picks):
            ax = fig.add_subplot(grid[2 * row, col])
            ax.imshow(s.frames[f], interpolation="nearest")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(s.key, fontsize=7, loc="left")
        wave = fig.add_subplot(grid[2 * row + 1, :])
        t = np.arange(s.audio.shape[1]) / float(s.meta.get("sample_rate", 16000))
        wave.plot(t, s.audio[0], linewidth=0.4)  # first channel
        wave.set_xlim(0, t[-1] if len(t) else 1)
        wave.tick_params(labelsize=6)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sheet.", suffix=".png", dir=folder)
    os.close(fd)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)


def inspect_shards(
    path: str,
    sheet: str | None = None,
    sheet_clips: int = 4,
    spec: DecodeSpec | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Read every sample once; returns the summary (and writes the contact sheet if asked)."""
    counter = BadSampleCounter()
    fps, rates = Counter(), Counter()
    n, seconds, first = 0, 0.0, []
    for s in iter_samples(path, spec=spec, counter=counter):
        n += 1
        fps[str(s.meta.get("fps"))] += 1
        rates[str(s.meta.get("sample_rate"))] += 1
        seconds += s.audio.shape[1] / (spec or DecodeSpec()).sample_rate  # (F-1)/fps + 40 ms
        if len(first) < sheet_clips:
            first.append(s)
        if progress is not None:
            progress(n)
    if sheet is not None and first:
        contact_sheet(first, sheet)
    return {
        "path": path,
        "samples": n,
        "total_seconds": round(seconds, 3),
        "fps": dict(sorted(fps.items())),
        "sample_rate": dict(sorted(rates.items())),
        "bad_samples": counter.counts(),
        "bad_total": counter.total,
        "contact_sheet": sheet if first and sheet else None,
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _found(truth: list[float], detected: list[float]) -> int:
    """Ground-truth times with a detection within TOLERANCE_S."""
    d = np.asarray(detected, dtype=np.float64)
    return sum(bool(d.size and np.min(np.abs(d - t)) <= TOLERANCE_S) for t in truth)


def _detectable(frames: np.ndarray, audio: np.ndarray, meta: dict) -> tuple[int, int, int]:
    """(ground-truth contacts, found in video, found in audio) for one clip."""
    from data.sync import detect_contacts, detect_onsets

    truth = [float(e["time"]) for e in meta.get("events", [])]
    span = (len(frames) - 1) / float(meta["fps"])
    truth = [t for t in truth if t <= span]  # the video cannot show contacts past its last frame
    video = _found(truth, detect_contacts(frames, float(meta["fps"])))
    sound = _found(truth, detect_onsets(audio, int(meta["sample_rate"])))
    return len(truth), video, sound


def fit_codec(
    path: str,
    out_dir: str,
    max_clips: int | None = None,
    spec: DecodeSpec | None = None,
    progress: Callable[[int], None] | None = None,
    grid: int = 8,
) -> dict[str, Any]:
    """Fit model.codecs on the shards, save to `out_dir`, report round-trip quality.

    `grid` = latent cells per side (the model preset's `video_latent_hw`: 8 for demo, 4 for tiny).
    """
    import torch

    from model.codecs import fit_codecs, save_codecs

    def clips() -> Any:
        for i, s in enumerate(iter_samples(path, spec=spec, counter=counter)):
            if max_clips is not None and i >= max_clips:
                return
            yield s

    counter = BadSampleCounter()
    video, audio = fit_codecs(((s.frames, s.audio) for s in clips()), grid=grid)
    save_codecs(out_dir, video, audio)
    psnr, totals, n = [], np.zeros(5, dtype=np.int64), 0  # truth, mp4 v/a, codec v/a
    with torch.no_grad():
        for s in clips():
            rec_v = video.decode(video.encode(torch.from_numpy(s.frames))).numpy()
            rec_a = audio.decode(audio.encode(torch.from_numpy(s.audio))).numpy()
            psnr.append(_psnr(rec_v[: len(s.frames)], s.frames[: len(rec_v)]))
            truth, v0, a0 = _detectable(s.frames, s.audio, s.meta)
            _, v1, a1 = _detectable(rec_v, rec_a, s.meta)
            totals += (truth, v0, a0, v1, a1)
            n += 1
            if progress is not None:
                progress(n)
    truth = int(totals[0])
    return {
        "codec_dir": out_dir,
        "clips": n,
        "video_psnr_db": round(float(np.mean(psnr)), 2) if psnr else None,
        "contacts": truth,
        "mp4_video_found": int(totals[1]),
        "mp4_audio_found": int(totals[2]),
        "codec_video_found": int(totals[3]),
        "codec_audio_found": int(totals[4]),
        "bad_samples": counter.counts(),
    }
