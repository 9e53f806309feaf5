"""The synthetic world: shapes, determinism, analytic contacts, bursts, captions."""

from __future__ import annotations

import numpy as np
import pytest

from data.world import (
    BACKGROUND,
    COLOURS,
    PITCHES,
    _trajectory,
    caption_vocabulary,
    parse_caption,
    render_clip,
)


def test_shapes_and_meta() -> None:
    clip = render_clip(0)
    assert clip.frames.shape == (121, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (1, 80640) and clip.audio.dtype == np.float32
    m = clip.meta
    assert (m["fps"], m["sample_rate"], m["seconds"], m["width"], m["height"]) == (
        24, 16000, 5.04, 64, 64,
    )  # fmt: skip
    assert 1 <= len(m["balls"]) <= 2
    for b in m["balls"]:
        assert b["colour"] in COLOURS and b["pitch"] in PITCHES
        assert b["pitch_hz"] == PITCHES[b["pitch"]]
    assert all(0 < e["time"] < 80640 / 16000 for e in m["events"])
    assert [e["time"] for e in m["events"]] == sorted(e["time"] for e in m["events"])


def test_other_geometries() -> None:
    tiny = render_clip(3, seconds=1.04, height=32, width=32)
    assert tiny.frames.shape == (25, 32, 32, 3)
    assert tiny.audio.shape == (1, 16640)  # 1 s + one 40 ms window
    wide = render_clip(4, height=48, width=80)
    assert wide.frames.shape == (121, 48, 80, 3)


def test_bad_frame_count_is_named() -> None:
    with pytest.raises(ValueError, match=r"120 frames; expected 1 \+ 8k"):
        render_clip(0, seconds=5.0)


def test_deterministic_and_seed_dependent() -> None:
    a, b, c = render_clip(7), render_clip(7), render_clip(8)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert a.meta == b.meta
    assert not np.array_equal(a.frames, c.frames)


def test_contacts_per_clip_and_positions_touch_walls() -> None:
    counts = [len(render_clip(s, n_balls=1).meta["events"]) for s in range(30)]
    assert 5.0 <= np.mean(counts) <= 10.0  # ~7 per 5 s at 64x64
    clip = render_clip(11, n_balls=1)
    ball = clip.meta["balls"][0]
    for ev in clip.meta["events"]:
        # Ball centre at the contact time is exactly radius away from the named wall.
        x, y = _trajectory(ball, np.array([ev["time"]]), 64, 64)
        gap = {"left": x[0], "right": 64 - x[0], "top": y[0], "bottom": 64 - y[0]}[ev["wall"]]
        assert gap == pytest.approx(ball["radius"], abs=1e-6)


def test_bursts_start_at_contacts_and_have_the_ball_pitch() -> None:
    clip = render_clip(5, n_balls=1)
    audio, sr = clip.audio[0], 16000
    for ev in clip.meta["events"]:
        n = int(ev["time"] * sr)
        assert np.all(audio[max(0, n - 40) : n] == 0.0)  # silent before the exact onset
        seg = audio[n : n + int(0.03 * sr)]
        assert np.abs(seg).max() > 0.3
    spec = np.abs(np.fft.rfft(audio)) ** 2
    peak_hz = np.fft.rfftfreq(len(audio), 1 / sr)[spec.argmax()]
    assert peak_hz == pytest.approx(clip.meta["balls"][0]["pitch_hz"], rel=0.03)


def test_background_is_dark_and_ball_has_its_colour() -> None:
    clip = render_clip(2, n_balls=1)
    f0 = clip.frames[0].astype(float) / 255
    assert np.median(f0) == pytest.approx(BACKGROUND, abs=0.01)
    rgb = np.asarray(COLOURS[clip.meta["balls"][0]["colour"]])
    assert np.min(np.abs(f0.reshape(-1, 3) - rgb).sum(1)) < 0.03
    # Anti-aliasing: edge pixels take intermediate values.
    levels = np.unique(clip.frames[0, ..., 0])
    assert len(levels) > 4


def test_captions_round_trip_through_vocabulary() -> None:
    vocab = set(caption_vocabulary())
    for s in range(20):
        meta = render_clip(s, seconds=1.04, height=32, width=32).meta
        assert set(meta["caption"].split()) <= vocab
        parsed = parse_caption(meta["caption"])
        assert [p["colour"] for p in parsed] == [b["colour"] for b in meta["balls"]]
        assert [p["pitch"] for p in parsed] == [b["pitch"] for b in meta["balls"]]
    with pytest.raises(ValueError, match="purple"):
        parse_caption("a small purple ball moving up-left with a high ping")
