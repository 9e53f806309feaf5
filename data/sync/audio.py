"""Audio side of the sync measurement (re-exported by `data.sync`): samples only, pure numpy.

Onsets from a 5 ms log-energy crossing a threshold below the clip's loudest window, and the
dominant named pitch. Sample n is at time n / sample_rate (data.world's convention).
"""

from __future__ import annotations

import numpy as np

from data.world import PITCHES

ONSET_WINDOW_S = 0.005  # 5 ms log-energy
ONSET_HOP_S = 0.001
ONSET_DROP_DB = 20.0  # threshold below the clip's loudest 5 ms
ONSET_FLOOR_DB = -60.0  # never call anything quieter than this an onset
ONSET_MIN_GAP_S = 0.020


def _mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 2:
        return a.mean(0)
    if a.ndim != 1:
        raise ValueError(f"audio must be [C, S] or [S], got shape {a.shape}")
    return a


def detect_onsets(audio: np.ndarray, sample_rate: int) -> list[float]:
    """Onset times (s): 5 ms log-energy (1 ms hop) rising through loudest - 20 dB.

    Each window is timed at its end, so a sharp attack is reported ~0.5 ms late; crossings are
    interpolated linearly between hops. Re-arms only after the energy falls below threshold.
    """
    x = _mono(audio)
    win, hop = int(round(ONSET_WINDOW_S * sample_rate)), int(round(ONSET_HOP_S * sample_rate))
    if len(x) < win:
        return []
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    starts = np.arange(0, len(x) - win + 1, hop)
    level = 10.0 * np.log10((c[starts + win] - c[starts]) / win + 1e-12)  # dB per window
    thr = max(level.max() - ONSET_DROP_DB, ONSET_FLOOR_DB)
    onsets: list[float] = []
    above = level >= thr
    for j in np.flatnonzero(above[1:] & ~above[:-1]) + 1:
        frac = (thr - level[j - 1]) / max(level[j] - level[j - 1], 1e-9)
        t = (starts[j - 1] + frac * hop + win) / sample_rate
        if not onsets or t - onsets[-1] >= ONSET_MIN_GAP_S:
            onsets.append(float(t))
    if above[0]:
        onsets.insert(0, win / sample_rate)
    return onsets


def dominant_pitch(audio: np.ndarray, sample_rate: int) -> str:
    """Named pitch with the most spectral energy within +-4 % of its frequency."""
    x = _mono(audio)
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    energy = {k: power[np.abs(freqs - f) <= 0.04 * f].sum() for k, f in PITCHES.items()}
    return max(energy, key=energy.get)
