"""Sync and appearance of generated clips through different video decodes of the SAME latents.

Session 13 found the learned decode (`CellDrawer`) lowered the measured sync of generated clips
against the linear decode; this script measures that for any set of decodes without generating
twice. Two steps:

    python benchmarks/drawer_sync.py gen --teacher pipeline/assets/demo-teacher \
        --student <student bundle dir> --clips 16 --out /tmp/latents.pt
    python benchmarks/drawer_sync.py score /tmp/latents.pt --codec old=pipeline/assets/demo-teacher \
        --codec new=<bundle or codec folder> [--json out.json]

`gen` generates exactly what the demo's evaluation does (deploy/demo_steps.compare: one-ball
world prompts of seeds 1000 + i, 5 s, the teacher's shipped sampler, the student streamed) and
keeps the video latents and the decoded audio (the audio decode does not change). `score`
decodes each clip's latents linearly and through every named codec's drawer and prints the
report rows of `omniforcing eval` per decode, plus the real clips' codec ceiling per decode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

SEED, SECONDS = 1000, 5  # deploy/demo_steps.compare
KEYS = (
    "contact_recall",
    "contact_recall_lo",
    "contact_recall_hi",
    "median_offset_ms",
    "reversals_per_clip",
    "contacts_per_clip",
    "ball_visible_frac",
    "ball_contrast",
    "ball_radius_px",
    "direction_acc",
)


class _Recorder:
    """Wraps a video codec: records the latents it is asked to decode, decodes linearly."""

    def __init__(self, codec: Any) -> None:
        self.codec, self.linear, self.latents = codec, codec.with_drawer(None), []

    def decode(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
        self.latents.append(latents.clone())
        return self.linear.decode(latents, start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.codec, name)


def generate(args: argparse.Namespace) -> None:
    from model import StreamingGenerator
    from model.sampling import sample_teacher
    from pipeline import evaluate as ev
    from pipeline.registry import load_bundle

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"seed": SEED, "seconds": SECONDS, "sets": {}}
    bundles = {"teacher": load_bundle(args.teacher), "student": load_bundle(args.student)}
    cfg = bundles["teacher"].config
    truth = ev.world_clips(args.clips, SECONDS, SEED, cfg.height, cfg.width, max_balls=1)
    out["truth"] = [(c.frames, c.audio, c.meta) for c in truth]
    for name, b in bundles.items():
        rows = []
        for i, c in enumerate(truth):
            t0 = time.perf_counter()
            prompt = c.meta["caption"]
            if b.config.causal:
                rec = _Recorder(b.video_codec)
                b.video_codec = rec
                chunks = list(StreamingGenerator(b).stream(prompt, SECONDS, SEED + i))
                b.video_codec = rec.codec
                video = torch.cat(rec.latents)
                audio = torch.cat([ch.audio for ch in chunks], dim=1)
            else:
                v, a = sample_teacher(
                    b.model, b.text_encoder, [prompt], SECONDS,
                    torch.Generator().manual_seed(SEED + i), steps=40, guide=b.guide,
                    stagger=b.stagger,
                )  # fmt: skip
                video = v[0].float().cpu()
                audio = b.audio_codec.decode(a[0].float().cpu(), start=0)
            meta = {"caption": prompt, "fps": cfg.fps, "sample_rate": cfg.sample_rate,
                    "seed": SEED + i}  # fmt: skip
            rows.append((video, audio.float().numpy(), meta))
            print(f"{name} clip {i}: {time.perf_counter() - t0:.1f} s", flush=True)
        out["sets"][name] = rows
        torch.save(out, args.out)
    print(f"wrote {args.out}")


def _codec(ref: str) -> Any:
    from data.draw import _load

    return _load(Path(ref))[1]


def paired(base: list[dict], other: list[dict], resamples: int = 2000) -> dict[str, float]:
    """Difference other − base of pooled contact recall (and reversals per clip) on the same clips
    (rows of `evaluate`'s "clips"), with a 95 % interval from resampling clips (paired: one
    index draw for both decodes)."""
    import numpy as np

    def arrays(rows: list[dict]) -> tuple[np.ndarray, ...]:
        hits = np.array([r["within_tol"] for r in rows], float)
        n = np.array([len(r["contacts"]) for r in rows], float)
        return hits, n, np.array([len(r["reversals"]) for r in rows], float)

    (h0, n0, r0), (h1, n1, r1) = arrays(base), arrays(other)
    idx = np.random.default_rng(0).integers(0, len(base), size=(resamples, len(base)))
    d = h1[idx].sum(1) / np.maximum(n1[idx].sum(1), 1) - h0[idx].sum(1) / np.maximum(
        n0[idx].sum(1), 1
    )
    dr = (r1[idx] - r0[idx]).mean(1)
    return {
        "d_recall": float(h1.sum() / n1.sum() - h0.sum() / n0.sum()),
        "d_recall_lo": float(np.percentile(d, 2.5)),
        "d_recall_hi": float(np.percentile(d, 97.5)),
        "d_reversals": float((r1 - r0).mean()),
        "d_reversals_lo": float(np.percentile(dr, 2.5)),
        "d_reversals_hi": float(np.percentile(dr, 97.5)),
    }


def score(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from pipeline import evaluate as ev

    torch.set_num_threads(args.threads)
    data = torch.load(args.latents, weights_only=False)
    named = dict(c.split("=", 1) for c in args.codec)
    codecs = {k: _codec(v) for k, v in named.items()}
    decodes = {"linear": next(iter(codecs.values())).with_drawer(None)} | codecs
    n = args.clips or len(data["truth"])
    truth = [ev.EvalClip(f"world-{i}", f, a, m) for i, (f, a, m) in enumerate(data["truth"][:n])]
    reports: dict[str, Any] = {"n_clips": n}
    rows: dict[str, list[dict]] = {}
    for dname, codec in decodes.items():
        for sname, gen in data["sets"].items():
            clips, t_dec = [], 0.0
            for video, audio, meta in gen[:n]:
                t0 = time.perf_counter()
                frames = codec.decode(video, start=0).numpy()
                t_dec += time.perf_counter() - t0
                clips.append(ev.EvalClip(f"gen-{meta['seed']}", frames, audio, meta))
            rep = ev.evaluate(clips)
            rows[f"{sname}/{dname}"] = rep["clips"]
            reports[f"{sname}/{dname}"] = {k: rep.get(k) for k in KEYS} | {
                "decode_s_per_s": t_dec / (n * data["seconds"])
            }
            if dname != "linear":  # paired with the linear decode of the same latents
                reports[f"{sname}/{dname}"] |= paired(rows[f"{sname}/linear"], rep["clips"])
        rep = ev.evaluate(ev.ceiling(_Bundle(codec), truth))
        reports[f"ceiling/{dname}"] = {k: rep.get(k) for k in KEYS}
    for key, rep in reports.items():
        if isinstance(rep, dict):
            cells = " ".join(
                f"{k}={v:.3f}" for k, v in rep.items() if isinstance(v, float) and np.isfinite(v)
            )
            print(f"{key}: {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2, default=float))
    return reports


class _Bundle:
    """What `evaluate.ceiling` reads of a bundle: its codecs (the audio one from the demo)."""

    def __init__(self, video: Any) -> None:
        self.video_codec = video
        self.audio_codec = _audio()


_AUDIO: list[Any] = []


def _audio() -> Any:
    if not _AUDIO:
        from data.draw import _load

        holder, _ = _load(Path("pipeline/assets/demo-teacher"))
        _AUDIO.append(holder[1].audio_codec)
    return _AUDIO[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--teacher", default="pipeline/assets/demo-teacher")
    g.add_argument("--student", required=True)
    g.add_argument("--clips", type=int, default=16)
    g.add_argument("--out", required=True)
    g.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("latents")
    s.add_argument("--codec", action="append", default=[], help="name=bundle or codec folder")
    s.add_argument("--clips", type=int, default=0, help="first n clips (0: all)")
    s.add_argument("--json")
    s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    (generate if args.cmd == "gen" else score)(args)


if __name__ == "__main__":
    main()
