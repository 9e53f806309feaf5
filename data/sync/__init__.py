"""Sync measurement for clips of the synthetic world (rendered, decoded, or generated).

Holds the sync report of visible contacts (direction reversals at a wall) against onsets, the
shuffled-pair chance level and `evaluate_clips`, the core of `omniforcing eval`, which adds motion
statistics and caption adherence (dominant colour and pitch). The detectors live beside it and are
re-exported here: the blob tracker, reversal detector, motion statistics and dominant colour in
`data.sync.video`, the onset detector and dominant pitch in `data.sync.audio`. Pure numpy: it reads
only pixels and samples, never a codec or a model, so it works on any clip of the world, including
clips decoded from mp4 files it did not make. Deliberately does NOT render (that is `data.world`).

Time conventions match data.world: frame f at f / fps, sample n at n / sample_rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# The detectors' tuning constants are public names too (read them here; they are defined, and
# take effect, in the submodule: assigning data.sync.X does not retune the detector).
from data.sync.appearance import VISIBLE_CONTRAST, appearance, summarise_appearance
from data.sync.audio import (
    ONSET_DROP_DB,
    ONSET_FLOOR_DB,
    ONSET_HOP_S,
    ONSET_MIN_GAP_S,
    ONSET_WINDOW_S,
    detect_onsets,
    dominant_pitch,
)
from data.sync.video import (
    COS_POWER,
    TRACK_RADIUS,
    WALL_PX_AT_64,
    analyse_motion,
    detect_contacts,
    dominant_colour,
    motion_stats,
    track_blobs,
    wall_px,
)
from data.world import parse_caption

__all__ = [
    "COS_POWER",
    "ONSET_DROP_DB",
    "ONSET_FLOOR_DB",
    "ONSET_HOP_S",
    "ONSET_MIN_GAP_S",
    "ONSET_WINDOW_S",
    "TRACK_RADIUS",
    "VISIBLE_CONTRAST",
    "WALL_PX_AT_64",
    "analyse_motion",
    "appearance",
    "detect_contacts",
    "detect_onsets",
    "dominant_colour",
    "dominant_pitch",
    "clip_row",
    "evaluate_clips",
    "motion_stats",
    "shuffled_chance",
    "summarise",
    "summarise_appearance",
    "sync_report",
    "track_blobs",
    "wall_contacts",
    "wall_px",
]


def _nearest(contacts: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    """Signed offset (onset - contact) to the nearest onset for each contact [N]."""
    if len(onsets) == 0:
        return np.full(len(contacts), np.inf)
    d = onsets[None, :] - contacts[:, None]
    return d[np.arange(len(contacts)), np.abs(d).argmin(1)]


def sync_report(contacts: list[float], onsets: list[float], tol: float = 0.040) -> dict[str, Any]:
    """Share of contacts with an onset within `tol`, share of onsets near a contact, offsets."""
    c, o = np.asarray(contacts, float), np.asarray(onsets, float)
    off = _nearest(c, o)
    back = np.abs(_nearest(o, c))
    finite = np.abs(off[np.isfinite(off)])
    return {
        "n_contacts": len(c),
        "n_onsets": len(o),
        "tol_ms": tol * 1e3,
        "contact_recall": float(np.mean(np.abs(off) <= tol)) if len(c) else float("nan"),
        "onset_precision": float(np.mean(back <= tol)) if len(o) else float("nan"),
        "median_offset_ms": float(np.median(finite) * 1e3) if len(finite) else float("nan"),
        "p90_offset_ms": float(np.percentile(finite, 90) * 1e3) if len(finite) else float("nan"),
        "median_signed_offset_ms": (
            float(np.median(off[np.isfinite(off)]) * 1e3) if len(finite) else float("nan")
        ),
    }


def _clip_hits(
    pairs: list[tuple[list[float], list[float]]], tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: contacts with an onset within `tol`, and contacts ([N] ints each)."""
    hits = [
        int(np.sum(np.abs(_nearest(np.asarray(c, float), np.asarray(o, float))) <= tol))
        for c, o in pairs
    ]
    return np.asarray(hits, dtype=np.int64), np.asarray([len(c) for c, _ in pairs], dtype=np.int64)


def _pooled_recall(pairs: list[tuple[list[float], list[float]]], tol: float) -> float:
    hits, totals = _clip_hits(pairs, tol)
    return int(hits.sum()) / int(totals.sum()) if totals.sum() else float("nan")


def clip_bootstrap_interval(
    pairs: list[tuple[list[float], list[float]]],
    tol: float = 0.040,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the pooled contact recall with clips resampled with replacement.

    Clips are the unit, not contacts: the contacts of one clip share its sampling noise, so a
    binomial interval over contacts would be too narrow. Fixed seed: the same rows give the same
    interval. (nan, nan) for fewer than two clips or no contacts."""
    hits, totals = _clip_hits(pairs, tol)
    if len(pairs) < 2 or totals.sum() == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    h, t = hits[idx].sum(1), totals[idx].sum(1)
    shares = h[t > 0] / t[t > 0]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(shares, [tail, 100 - tail])
    return float(lo), float(hi)


def shuffled_chance(pairs: list[tuple[list[float], list[float]]], tol: float = 0.040) -> float:
    """Contact recall when clip i's contacts meet clip j != i's onsets (mean of cyclic shifts)."""
    n = len(pairs)
    if n < 2:
        return float("nan")
    shifted = [
        _pooled_recall([(pairs[i][0], pairs[(i + s) % n][1]) for i in range(n)], tol)
        for s in range(1, n)
    ]
    return float(np.nanmean(shifted))


def _unpack(item: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A clip as a Clip-like object (.frames, .audio, .meta), a dict or a (frames, audio, meta)."""
    if hasattr(item, "frames") and hasattr(item, "audio"):
        return np.asarray(item.frames), np.asarray(item.audio), dict(getattr(item, "meta", {}))
    if isinstance(item, dict):
        return np.asarray(item["frames"]), np.asarray(item["audio"]), dict(item.get("meta", {}))
    frames, audio, *rest = item
    return np.asarray(frames), np.asarray(audio), dict(rest[0] if rest else {})


def wall_contacts(motion: dict[str, Any], frames: np.ndarray) -> list[float]:
    """Visible contacts of `analyse_motion(frames)`: its reversals within `wall_px` of a wall."""
    near = wall_px(frames)
    return [t for t, d in zip(motion["contacts"], motion["wall_dist"], strict=True) if d <= near]


def clip_row(
    frames: np.ndarray, audio: np.ndarray, meta: dict, tol: float = 0.040
) -> dict[str, Any]:
    """One clip's detections (the single pass `evaluate_clips` and `omniforcing eval` share):
    visible contacts and every reversal (s), onsets (s), tracks [T,F,2], speed, colour, pitch."""
    frames, audio = np.asarray(frames), np.asarray(audio)
    fps, sr = float(meta.get("fps", 24)), int(meta.get("sample_rate", 16000))
    m = analyse_motion(frames, fps)
    onsets = detect_onsets(audio, sr)
    row: dict[str, Any] = {
        "contacts": wall_contacts(m, frames),  # visible contacts: the sync metrics count these
        "reversals": m["contacts"],  # every reversal, open-space ones of a generated clip too
        "onsets": onsets,
        "tracks": m["tracks"],
        "speed_px_s": m["speed_px_s"],
        "colour": dominant_colour(frames),
        "pitch": dominant_pitch(audio, sr),
        **appearance(frames),  # what a viewer sees: visible share, contrast, radius
    }
    if meta.get("caption"):
        try:
            balls = parse_caption(meta["caption"])
        except ValueError:
            balls = []
        row["colour_ok"] = row["colour"] in {b["colour"] for b in balls}
        row["pitch_ok"] = row["pitch"] in {b["pitch"] for b in balls}
    if "events" in meta:
        gt = [float(e["time"]) for e in meta["events"]]
        row["gt_video"] = sync_report(gt, m["contacts"], tol)["contact_recall"]
        row["gt_audio"] = sync_report(gt, onsets, tol)["contact_recall"]
    return row


def evaluate_clips(clips: Iterable[Any], tol: float = 0.040) -> dict[str, Any]:
    """Aggregate sync, motion and caption adherence over clips of the world.

    Each clip: Clip-like, dict or (frames uint8 [F,H,W,3], audio [C,S], meta); meta may give
    fps / sample_rate (default 24 / 16000), caption (-> colour/pitch accuracy) and ground-truth
    events (-> detector recall against the truth). Offsets are pooled over all contacts.
    """
    rows = [clip_row(*_unpack(c), tol) for c in clips]
    if not rows:
        raise ValueError("evaluate_clips got no clips")
    return summarise(rows, tol)


def summarise(rows: list[dict[str, Any]], tol: float = 0.040) -> dict[str, Any]:
    """The aggregate report of `clip_row` rows (see `evaluate_clips`)."""
    pairs = [(r["contacts"], r["onsets"]) for r in rows]
    contacts = [t for r in rows for t in r["contacts"]]
    n_rev = sum(len(r["reversals"]) for r in rows)
    n_on = sum(len(r["onsets"]) for r in rows)
    offs = np.concatenate([_nearest(np.asarray(c, float), np.asarray(o, float)) for c, o in pairs])
    finite = np.abs(offs[np.isfinite(offs)])
    near = sum(
        int(np.sum(np.abs(_nearest(np.asarray(o, float), np.asarray(c, float))) <= tol))
        for c, o in pairs
    )
    lo, hi = clip_bootstrap_interval(pairs, tol)
    out: dict[str, Any] = {
        "n_clips": len(rows),
        "tol_ms": tol * 1e3,
        "reversals_per_clip": n_rev / len(rows),
        "contacts_per_clip": len(contacts) / len(rows),
        "onsets_per_clip": n_on / len(rows),
        "speed_px_s": float(np.mean([r["speed_px_s"] for r in rows])),
        "wall_frac": len(contacts) / n_rev if n_rev else float("nan"),
        "contact_recall": _pooled_recall(pairs, tol),
        # 95 % interval with clips resampled: two teachers within it are not told apart.
        "contact_recall_lo": lo,
        "contact_recall_hi": hi,
        # The same share over every reversal (open-space ones too): how it was counted before
        # visible contacts were told apart; reported beside it, never instead.
        "reversal_recall": _pooled_recall([(r["reversals"], r["onsets"]) for r in rows], tol),
        "onset_precision": near / n_on if n_on else float("nan"),
        "chance_recall": shuffled_chance(pairs, tol),
        "median_offset_ms": float(np.median(finite) * 1e3) if len(finite) else float("nan"),
        "p90_offset_ms": float(np.percentile(finite, 90) * 1e3) if len(finite) else float("nan"),
    }
    out |= summarise_appearance(rows)
    for key, name in (
        ("colour_ok", "colour_acc"),
        ("pitch_ok", "pitch_acc"),
        ("gt_video", "gt_video_recall"),
        ("gt_audio", "gt_audio_recall"),
    ):
        vals = [float(r[key]) for r in rows if key in r and r[key] == r[key]]
        if vals:
            out[name] = float(np.mean(vals))
    return out
