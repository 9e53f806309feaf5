"""Audio-sink ablation: Self-Forcing DMD with the audio sinks on vs off, same seed, same steps.

Runs the `self-forcing` stage's own generator/critic updates in-process (plain AdamW with the
config's gradient clipping standing in for the DeepSpeed engine; no Ray), once with the preset's
sinks and once with `num_sinks=0`, and prints per-run gradient figures measured before clipping:
audio-stream parameter gradient norm (mean / max / last), video-stream likewise, the DMD gradient
norm at the audio output, and the audio/video parameter-gradient ratio. The figure that matters
is the ratio of the two runs' audio gradient norms, measured side by side here. With a trained
teacher bundle (`--teacher`, fitted codecs) it also decodes a few student clips and reports the
sync error of `data.sync.evaluate_clips`; a random-weight teacher makes that meaningless, so it
is skipped then.
Usage: python benchmarks/sinks_ablation.py --preset tiny --steps 20 [--teacher DIR] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (benchmarks/data.py shadows `data`)

import torch  # noqa: E402

from pipeline.config import validate  # noqa: E402
from pipeline.stages import WorkerContext  # noqa: E402
from pipeline.stages.self_forcing import SelfForcingStage  # noqa: E402
from pipeline.trainer import random_rows  # noqa: E402


class LocalEngine:
    """AdamW + gradient clipping behind the engine methods the stage calls (single process)."""

    plain = True

    def __init__(self, module: torch.nn.Module, lr: float, clip: float) -> None:
        self.module, self.clip = module, clip
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.module.train()

    def get_lr(self) -> list[float]:
        return [self.opt.param_groups[0]["lr"]]


def run(args: argparse.Namespace, teacher: str, sinks: int | None) -> dict[str, Any]:
    """One Self-Forcing run; returns the gradient figures (and sync error if measurable)."""
    raw = {
        "model": {"preset": args.preset} | ({"num_sinks": sinks} if sinks is not None else {}),
        "data": {"source": "random", "batch_size": args.batch, "seconds": args.seconds},
        "train": {"seed": args.seed, "lr": args.lr, "precision": "fp32"},
        "distill": {
            "teacher": teacher,
            "critic_updates_per_generator": args.critic_updates,
            "loss_scope": args.scope,
            "prefix": args.prefix,
        },
    }
    cfg = validate(raw, source="sinks_ablation")
    ctx = WorkerContext(cfg, 0, 1, torch.device("cpu"), torch.float32)
    torch.manual_seed(args.seed)
    stage = SelfForcingStage()
    stage.build(
        ctx, lambda net, lr=None, per_step=1: LocalEngine(net, lr or args.lr, cfg.train.clip_grad)
    )
    rows = random_rows(cfg)
    hist: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = [rows[(step * args.batch + i) % len(rows)] for i in range(args.batch)]
        batch = {k: [r[k] for r in pick] for k in ("key", "caption")}
        batch |= {
            k: torch.stack([torch.as_tensor(r[k]) for r in pick]).numpy()
            for k in ("video", "audio")
        }
        for k, v in stage.train_step(step, lambda b=batch: b, ctx).items():
            hist.setdefault(k, []).append(v)
    pa, pv = hist["grad/param_audio"], hist["grad/param_video"]
    out = {
        "num_sinks": stage.engine.module.cfg.sinks,
        "seconds_per_step": (time.perf_counter() - t0) / args.steps,
        "audio_param_grad": {"mean": statistics.mean(pa), "max": max(pa), "last": pa[-1]},
        "video_param_grad": {"mean": statistics.mean(pv), "max": max(pv), "last": pv[-1]},
        "audio_out_grad_mean": statistics.mean(hist["grad/out_audio"]),
        "audio_over_video": statistics.mean(a / max(v, 1e-12) for a, v in zip(pa, pv, strict=True)),
        "final_loss_dmd_audio": hist["loss/dmd_audio"][-1],
    }
    if args.teacher:
        out["sync"] = sync_error(stage, args)
    return out


def sync_error(stage: SelfForcingStage, args: argparse.Namespace) -> dict[str, Any] | str:
    """Sync of a few decoded student clips (needs a trained teacher's fitted codecs)."""
    from data.sync import evaluate_clips
    from model import StreamingGenerator
    from pipeline.distill.roles import student_bundle

    gen = StreamingGenerator(student_bundle(stage.engine.module, stage.teacher), stage.sigmas)
    clips = []
    for seed in range(args.sync_clips):
        chunks = list(gen.stream("a red ball", args.seconds, seed))
        frames = torch.cat([c.frames for c in chunks]).numpy()
        audio = torch.cat([c.audio for c in chunks], dim=1).numpy()
        clips.append((frames, audio, {"fps": chunks[0].fps, "sample_rate": chunks[0].sample_rate}))
    return evaluate_clips(clips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--teacher", default=None, help="trained teacher Bundle dir (else random)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--critic-updates", type=int, default=2)
    ap.add_argument("--scope", default="every_block", choices=["every_block", "last_block"])
    ap.add_argument("--prefix", default="generated", choices=["generated", "clean_from_teacher"])
    ap.add_argument("--sync-clips", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher is None:  # a random-weight bidirectional teacher of the preset
            from model.testing import tiny_bundle

            teacher = str(Path(tmp) / "teacher")
            tiny_bundle(seed=args.seed, causal=False, preset_name=args.preset).save_pretrained(
                teacher
            )
        result = {"sinks_on": run(args, teacher, None), "sinks_off": run(args, teacher, 0)}
    on, off = result["sinks_on"], result["sinks_off"]
    result["audio_grad_ratio_off_over_on"] = {
        k: off["audio_param_grad"][k] / max(on["audio_param_grad"][k], 1e-12)
        for k in ("mean", "max", "last")
    }
    result["config"] = vars(args)
    print(json.dumps(result, indent=2))
    if args.json:
        from benchmarks.report import write_atomic

        write_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
