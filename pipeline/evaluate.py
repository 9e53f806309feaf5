"""Evaluation of synthetic-world clips: where clips come from and what is measured on them.

Holds the clip sources of `omniforcing eval` (mp4 files with optional sidecar JSON, data shards,
generation with a bundle: causal student through `StreamingGenerator`, bidirectional teacher
through `sample_teacher` + `decode_clip`), the codec ceiling (ground truth encoded and decoded
through a bundle's codecs, no model), caption-direction adherence, and `evaluate`, which adds
that to `data.sync`'s report (sync error, share within tolerance vs shuffled chance,
motion, colour and pitch adherence). Measurement reads only pixels and samples, so any mp4 of the
world can be scored. Deliberately NOT here: printing, plots, MLflow logging (pipeline/
eval_commands.py) and the detectors themselves (data.sync).
"""

from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.sync import clip_row, summarise
from data.world import parse_caption, render_clip

TOL_S = 0.040  # a contact is "in sync" when an onset lies within 40 ms
DIRECTION_FRAMES = 4  # initial heading from the first 4 frame steps (~170 ms)
MAX_RADIUS = 6.0 / 64.0  # largest ball radius of the world, as a fraction of the frame side


@dataclass
class EvalClip:
    """One clip to score: frames uint8 [F,H,W,3], audio float32 [C,S], meta (caption, fps, ...)."""

    key: str
    frames: np.ndarray
    audio: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# --- sources ------------------------------------------------------------------------------------


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Folders (their *.mp4), globs and files -> sorted unique mp4 paths; none found is an error."""
    found: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.update(p.glob("*.mp4"))
        elif p.is_file():
            found.add(p)
        else:
            matches = [Path(m) for m in glob.glob(item)]
            if not matches:
                raise FileNotFoundError(f"input {item!r}: no such file, folder or glob match")
            found.update(m for m in matches if m.is_file())
    paths = sorted(found)
    if not paths:
        raise FileNotFoundError(f"inputs {inputs}: no mp4 files found")
    return paths


def clips_from_mp4(inputs: list[str], fps: int = 24, sample_rate: int = 16000) -> list[EvalClip]:
    """Decode mp4 files (PyAV); a sidecar `<stem>.json` may give caption/events (any JSON dict)."""
    from data.mp4 import DecodeError, DecodeSpec, decode_mp4

    clips = []
    for path in expand_inputs(inputs):
        try:
            dec = decode_mp4(path.read_bytes(), DecodeSpec(fps=fps, sample_rate=sample_rate))
        except DecodeError as err:
            raise ValueError(f"{path}: cannot decode ({err.kind}): {err}") from None
        meta: dict[str, Any] = {}
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{side}: sidecar is not valid JSON ({err})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{side}: sidecar must be a JSON object")
        meta.update(fps=fps, sample_rate=sample_rate)
        clips.append(EvalClip(path.stem, dec.frames, dec.audio, meta))
    return clips


def clips_from_shards(path: str, limit: int | None = None) -> list[EvalClip]:
    """Ground-truth clips from data shards (local or s3://), at most `limit` of them."""
    from data.reader import BadSampleCounter, iter_samples

    counter = BadSampleCounter()
    clips = []
    for s in iter_samples(path, counter=counter):
        meta = {**s.meta, "caption": s.caption}
        clips.append(EvalClip(s.key, s.frames, s.audio, meta))
        if limit is not None and len(clips) >= limit:
            break
    if not clips:
        raise ValueError(f"--shards {path}: no readable samples")
    return clips


def world_clips(
    n: int, seconds: int, seed: int, height: int, width: int, max_balls: int = 1
) -> list[EvalClip]:
    """Ground truth for generation: render_clip(seed + i) of `seconds` + 0.04 s (1 + 24 s frames).

    Their captions are the prompts, so a generated clip i and world clip i share caption and seed.
    `max_balls` must match the world the model was trained on (the embedded default: one ball);
    captions of a two-ball world are out of distribution for a one-ball teacher.
    """
    out = []
    for i in range(n):
        c = render_clip(
            seed + i, seconds=seconds + 1 / 24, height=height, width=width, max_balls=max_balls
        )
        out.append(EvalClip(f"world-{seed + i}", c.frames, c.audio, c.meta))
    return out


def generate(
    bundle: Any, prompts: list[str], seconds: int, seed: int, teacher_steps: int = 40
) -> list[EvalClip]:
    """One clip per prompt, clip i with seed + i. Causal -> streamed; bidirectional -> teacher.

    meta carries the caption and `gen_s_per_s` (wall seconds per second of content).
    """
    from model import StreamingGenerator
    from model.sampling import decode_clip, sample_teacher

    cfg = bundle.config
    out = []
    stream = StreamingGenerator(bundle) if cfg.causal else None
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        if stream is not None:
            chunks = list(stream.stream(prompt, seconds, seed + i))
            frames = torch.cat([c.frames for c in chunks])  # uint8 [1 + 24 s, H, W, 3]
            audio = torch.cat([c.audio for c in chunks], dim=1)  # [C, 640 + 16000 s]
        else:
            gen = torch.Generator().manual_seed(seed + i)
            v, a = sample_teacher(
                bundle.model,
                bundle.text_encoder,
                [prompt],
                seconds,
                gen,
                steps=teacher_steps,
                guide=bundle.guide,  # the sampler the teacher ships with (autoguidance)
                stagger=bundle.stagger,  # and its schedule
            )
            frames, audio = decode_clip(bundle, v[0], a[0])
        meta = {
            "caption": prompt,
            "fps": cfg.fps,
            "sample_rate": cfg.sample_rate,
            "seed": seed + i,
            "gen_s_per_s": (time.perf_counter() - t0) / seconds,
        }
        out.append(EvalClip(f"gen-{seed + i}", frames.numpy(), audio.float().numpy(), meta))
    return out


def ceiling(bundle: Any, clips: list[EvalClip]) -> list[EvalClip]:
    """Ground truth through the bundle's codecs only (encode -> decode), the best a model can do.

    Frames are cut to 1 + 8k (the video codec's geometry) and audio to the matching length.
    """
    out = []
    for c in clips:
        n = 1 + 8 * ((len(c.frames) - 1) // 8)
        frames = torch.as_tensor(np.ascontiguousarray(c.frames[:n]))
        audio = torch.as_tensor(np.ascontiguousarray(c.audio, dtype=np.float32))
        v = bundle.video_codec.encode(frames)  # [1 + k, h, w, C]
        a = bundle.audio_codec.encode(audio)  # [Fa, C]
        rec_v = bundle.video_codec.decode(v, start=0).numpy()
        rec_a = bundle.audio_codec.decode(a, start=0).float().numpy()
        out.append(EvalClip(c.key + "-ceiling", rec_v, rec_a, dict(c.meta)))
    return out


# --- measurement --------------------------------------------------------------------------------


def _axis_sign(x: np.ndarray, k: int, size: int, turn_px: float) -> int:
    """Initial sign of motion (+1, -1, or 0 = undecidable) along one axis of a track x [F].

    Looks at the first k frame steps. A wall contact inside them makes the path V-shaped: the
    leg before the apex is the initial motion. A ball that starts next to a wall (within the
    largest radius + one frame step of the frame edge, `size` px) at its extreme of the clip may
    have bounced before frame 1, which no pixel can show: 0.
    """
    w = x[: k + 1]
    step = abs(w[1] - w[0]) + turn_px
    at_extreme = min(abs(w[0] - x.min()), abs(w[0] - x.max())) <= step
    near_wall = min(w[0], size - w[0]) <= MAX_RADIUS * size + step
    if at_extreme and near_wall:
        return 0
    inner = range(1, len(w) - 1)
    apex = max(inner, key=lambda i: min(abs(w[i] - w[0]), abs(w[i] - w[-1])), default=0)
    if apex and min(abs(w[apex] - w[0]), abs(w[apex] - w[-1])) > turn_px:
        return 1 if w[apex] > w[0] else -1
    return 1 if w[-1] > w[0] else -1


def heading(track: np.ndarray, width: int, height: int, turn_px: float = 0.2) -> str:
    """Initial direction of one track [F, 2] (x right, y down): e.g. 'up-left'; an undecidable
    axis (a bounce before frame 1) is '?', e.g. '?-left', and matches either word."""
    k = min(DIRECTION_FRAMES, len(track) - 1)
    if k < 1:
        return "?-?"
    sx = _axis_sign(track[:, 0], k, width, turn_px)
    sy = _axis_sign(track[:, 1], k, height, turn_px)
    vert = "?" if sy == 0 else ("up" if sy < 0 else "down")
    return f"{vert}-{'?' if sx == 0 else ('left' if sx < 0 else 'right')}"


def heading_matches(measured: str, wanted: str) -> bool:
    """'?-left' matches 'up-left' and 'down-left'."""
    return all(m in ("?", w) for m, w in zip(measured.split("-"), wanted.split("-"), strict=True))


def clip_detail(clip: EvalClip, sync: dict[str, Any], tol: float = TOL_S) -> dict[str, Any]:
    """Per-clip detail from its `data.sync.clip_row`: visible contacts and all reversals (s),
    onsets (s), headings, direction adherence."""
    h, w = clip.frames.shape[1:3]
    heads = [heading(t, w, h) for t in sync["tracks"]]
    row: dict[str, Any] = {
        "key": clip.key,
        "contacts": sync["contacts"],
        "reversals": sync["reversals"],
        "onsets": sync["onsets"],
        "headings": heads,
        "speed_px_s": sync["speed_px_s"],
    }
    caption = clip.meta.get("caption")
    if caption:
        try:
            wanted = {b["direction"] for b in parse_caption(caption)}
        except ValueError:
            wanted = set()
        row["direction_ok"] = bool(wanted) and all(
            any(heading_matches(h, d) for d in wanted) for h in heads
        )
    c, o = np.asarray(row["contacts"]), np.asarray(row["onsets"])
    row["within_tol"] = int(sum(np.any(np.abs(o - t) <= tol) for t in c)) if len(o) else 0
    return row


def evaluate(clips: list[EvalClip], tol: float = TOL_S) -> dict[str, Any]:
    """Aggregate report over clips + per-clip detail rows (`clips` key, for plots and JSON).

    Keys: median_offset_ms, p90_offset_ms (|onset - contact| to the nearest onset, pooled),
    contact_recall (share within tol) next to chance_recall (shuffled pairs), reversals_per_clip,
    speed_px_s, colour_acc / pitch_acc / direction_acc where captions are known.
    """
    if not clips:
        raise ValueError("evaluate: no clips")
    for c in clips:
        f = np.asarray(c.frames)
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(
                f"clip {c.key}: frames must be uint8 [F,H,W,3], got {f.dtype} {f.shape}"
            )
    sync = [clip_row(c.frames, c.audio, c.meta, tol) for c in clips]
    report = summarise(sync, tol)
    rows = [clip_detail(c, r, tol) for c, r in zip(clips, sync, strict=True)]
    dirs = [float(r["direction_ok"]) for r in rows if "direction_ok" in r]
    if dirs:
        report["direction_acc"] = float(np.mean(dirs))
    speeds = [c.meta["gen_s_per_s"] for c in clips if "gen_s_per_s" in c.meta]
    if speeds:
        report["gen_s_per_s"] = float(np.mean(speeds))
    report["clips"] = rows
    return report
