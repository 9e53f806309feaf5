"""Self-Forcing distillation in one process on one device, without Ray, DeepSpeed or MLflow.

The `pipeline.single` path for the `self-forcing` stage: a lent GPU box has torch but not our
cluster stack, and a long distribution-matching run (thousands of DMD steps, issue 23) is what
2 CPU cores cannot do. It drives the same `SelfForcingStage` as `omniforcing train self-forcing`
(rollouts, DMD, critic updates, EMA) on `TorchEngine`s, on latents from `pipeline.single render`;
the student starts from `distill.student.init_from` (e.g. an ODE student's Bundle), the critic
from `distill.critic.init_from`, the real score is `distill.teacher`.

    python -m pipeline.single distill --config configs/demo.yaml --latents /tmp/latents \
        --minutes 8 --out /tmp/sf --set distill.student.init_from=/path/to/ode/bundle
    python -m pipeline.single export-student --weights /tmp/sf/student-step-002000 --out B

`distill` writes the student's EMA weights (`pipeline.single_record.save_weights`: files of at
most 15 MiB with the run's record) at `--snapshots` evenly spaced times, the last at the end;
`export-student` makes a causal student Bundle of one (`omniforcing eval --model B` scores it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config import JobConfig, load_config, validate
from pipeline.parallelize import TorchEngine
from pipeline.single_record import load_weights
from pipeline.stages import WorkerContext


def distill(
    cfg: JobConfig,
    latents: Path | Sequence[Path],
    minutes: float,
    out: Path,
    device: str,
    snapshots: int = 2,
    every: int = 0,
) -> list[Path]:
    """Self-Forcing until `minutes` have passed (or `train.steps` are done); the cosine horizon
    is set from the step rate measured over steps 5–25. `snapshots` are spread evenly over the
    budget; `every` > 0 also saves one each `every` steps (a curve by step, not by minute).
    Returns the snapshot prefixes."""
    from pipeline.single import RandomBatches, with_steps
    from pipeline.stages.self_forcing import SelfForcingStage

    if snapshots < 1:
        raise ValueError(f"--snapshots {snapshots}: at least 1 (the last is taken at the end)")
    if minutes <= 0:
        raise ValueError(f"--minutes {minutes}: a budget must be positive")
    if every < 0:
        raise ValueError(f"--every {every}: a step count, 0 for none")
    if cfg.distill.real_score != "local" or cfg.train.zero_stage == 3:
        raise ValueError(
            f"distill.real_score={cfg.distill.real_score}, train.zero_stage="
            f"{cfg.train.zero_stage}: one process scores locally (real_score: local) on one "
            "unpartitioned device (zero_stage < 3)"
        )
    start = time.time()
    deadline = start + minutes * 60
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    ctx = WorkerContext(cfg, 0, 1, dev, torch.float32)
    stage, engines = SelfForcingStage(), []

    def make(net: torch.nn.Module, lr: float | None = None, per_step: int = 1) -> TorchEngine:
        engines.append(TorchEngine(net.to(dev), cfg, lr, per_step))
        return engines[-1]

    stage.build(ctx, make)
    batches = RandomBatches(latents, cfg.data.batch_size, cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "trained_by": "python -m pipeline.single distill (SelfForcingStage on TorchEngine)",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "clips": len(batches.captions),
    }
    # Every 10th step's metrics: the record rides in each weight file's metadata, and a file must
    # stay under the 16 MiB a lease returns (pipeline.single_record.save_weights counts it).
    history: list[dict[str, float]] = []
    prefixes: list[Path] = []
    step, t_probe, saved, timed = 0, 0.0, -1, 0
    while step < cfg.train.steps and time.time() < deadline:
        metrics = stage.train_step(step, batches, ctx)
        step += 1
        if step == 5:
            t_probe = time.time()
        if step == 25:  # horizon = the steps that fit in the time left
            rate = (time.time() - t_probe) / 20  # 0.93: snapshots and the last step's overrun
            cfg = with_steps(
                cfg, min(cfg.train.steps, 25 + int(0.93 * (deadline - time.time()) / rate))
            )
            ctx.cfg = cfg
            for e in engines:
                e.cfg = cfg
            print(f"{rate:.2f} s/step: horizon {cfg.train.steps} steps", flush=True)
        if step % 10 == 0 or step <= 10:
            history.append({"step": step, **metrics})
            print(json.dumps({"step": step, **{k: round(v, 4) for k, v in metrics.items()}}))
        is_due = time.time() >= start + (deadline - start) * (timed + 1) / snapshots
        timed += is_due
        if is_due or step >= cfg.train.steps or (every and step % every == 0):
            prefixes.append(_snapshot(stage, cfg, record, history, step, start, out))
            saved = step
    if saved != step:
        if step == 0:
            print("warning: the budget ended before the first step: saving the start", flush=True)
        prefixes.append(_snapshot(stage, cfg, record, history, step, start, out))
    return prefixes


def _snapshot(
    stage: Any,
    cfg: JobConfig,
    record: dict[str, Any],
    history: list[dict[str, float]],
    step: int,
    start: float,
    out: Path,
) -> Path:
    """The student's EMA (else live) weights and the record so far at out/student-step-N."""
    from pipeline.single import _checkpoint

    prefix = out / f"student-step-{step:06d}"
    _checkpoint(stage, cfg, record, history, step, start, prefix, role="student")
    return prefix


def export_student(prefix: Path, out: Path) -> Path:
    """A `distill` snapshot → a causal student Bundle at `out` (the codecs and text encoder of
    the run's `distill.teacher`, which must resolve here; its σ list recorded for serving)."""
    from model import AVDiT
    from pipeline.distill import roles

    state, record = load_weights(prefix)
    cfg = validate(record["config"], source=f"{prefix} record")
    d = cfg.distill
    teacher = roles.load_teacher(d.teacher, torch.device("cpu"), torch.float32)
    net = AVDiT(roles.role_config("student", teacher.model.cfg, cfg))
    want = set(net.state_dict())
    missing = sorted(want - set(state))
    if missing:
        raise ValueError(
            f"{prefix}: the snapshot lacks {missing[:5]} (not a student of {d.teacher})"
        )
    net.load_state_dict({k: v for k, v in state.items() if k in want})
    roles.export_student(net, None, teacher, out, "self-forcing", d.student_sigmas)
    return out


COMMANDS = ("distill", "export-student")


def add_parsers(sub: Any) -> None:
    """The `distill` and `export-student` subcommands of `python -m pipeline.single`."""
    d = sub.add_parser("distill", help="Self-Forcing DMD (the self-forcing stage) for a budget")
    d.add_argument("--config", required=True)
    d.add_argument("--set", action="append", default=[], dest="overrides")
    d.add_argument("--latents", type=Path, action="append", required=True)
    d.add_argument("--minutes", type=float, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--snapshots", type=int, default=2, help="student weights saved, evenly")
    d.add_argument("--every", type=int, default=0, help="also save every N steps (0: no)")
    e = sub.add_parser("export-student", help="a `distill` snapshot → a causal student Bundle")
    e.add_argument("--weights", type=Path, required=True, help="<out>/student-step-N")
    e.add_argument("--out", type=Path, required=True)


def run(a: argparse.Namespace) -> None:
    if a.cmd == "distill":
        cfg = load_config(a.config, a.overrides)
        distill(cfg, a.latents, a.minutes, a.out, a.device, a.snapshots, a.every)
    else:
        print(export_student(a.weights, a.out))
