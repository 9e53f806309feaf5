"""Write the shipped teacher's training record from its MLflow run.

    python scripts/teacher_record.py --tracking-uri sqlite:////work/teacher/mlflow.db \
        --run <run id> --step 6000 --wall-minutes 95 --note "..." \
        --out pipeline/assets/demo-teacher-record

Reads the run's metric histories up to `--step` (loss per modality, cross-modal reliance, lr, grad
norm) and writes `training.json` (hardware, steps, wall time, histories) plus `loss.png` and
`reliance.png`, each atomically. The eval JSON/PNG come from `omniforcing eval --out`; this script
only records how the weights were made, so the record can be regenerated rather than hand-edited.

A later fine-tune extends the shipped record instead (the run's MLflow store need not be kept):

    python scripts/teacher_record.py --extend pipeline/assets/demo-teacher-record/training.json \
        --fine-tune <pipeline.single train output>/teacher --note "..."
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

KEYS = ("loss", "loss/video", "loss/audio", "grad_norm", "lr", "samples_per_s")
RELIANCE = ("reliance/audio_on_video", "reliance/video_on_audio")


def histories(uri: str, run: str, keys: tuple[str, ...], upto: int) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for k in keys:
        hist = sorted(client.get_metric_history(run, k), key=lambda m: m.step)
        out[k] = [[m.step, m.value] for m in hist if m.step <= upto]
    return out


def fine_tune(record: dict, prefix: Path) -> None:
    """Append a `pipeline.single train --init` continuation: its steps follow the record's so far,
    its metric history joins the run's (steps offset), `steps` and the wall time grow by its own."""
    from pipeline.single_record import load_weights

    _, ft = load_weights(prefix)
    base, train = record["steps"], ft["config"]["train"]
    for k, rows in record["metrics"].items():
        rows += [[base + r["step"], r[k]] for r in ft["metrics"] if k in r]
    section = {
        "by": ft["trained_by"] + " --init <the bundle of the steps before>",
        "from_step": base,
        "device": ft["device"],
        "clips": ft["clips"],
        "steps": ft["steps"],
        "wall_minutes": round(ft["wall_s"] / 60, 1),
        "lr": train["lr"],
        "sigma": train.get("sigma"),
        "batch_size": ft["config"]["data"]["batch_size"],
    }
    record.setdefault("fine_tunes", []).append(section)
    record["steps"] = base + ft["steps"]
    record["wall_minutes_to_step"] += section["wall_minutes"]


def base_record(args: argparse.Namespace) -> dict:
    """The record of the MLflow run up to --step: what the fine-tunes are appended to."""
    from benchmarks.report import machine_cpu

    metrics = histories(args.tracking_uri, args.run, KEYS + RELIANCE, args.step)
    # A fine-tune is exported from its own bundle (`pipeline.single export`), not a run step.
    before, source = "", f"<run>/step-{args.step:08d}"
    if args.fine_tune:
        before = "python -m pipeline.single export --weights <fine-tune>/teacher --out <bundle>; "
        source = "<bundle>"
    record = {
        "trained_by": "omniforcing train teacher --config configs/demo-teacher.yaml "
        "(data.path, codec_dir, storage, mlflow overridden to a scratch folder; --resume latest "
        "after each interruption)",
        "data": "omniforcing data synth --balls 1 --clips 2048 --seed 1 --shard-size 128; "
        "omniforcing data fit-codec --max-clips 256",
        "exported": f"{before}omniforcing export --checkpoint {source} "
        + (
            f"--guide <run>/step-{args.guide_step:08d} --guide-weight {args.guide_weight} "
            if args.guide_step is not None
            else ""
        )
        + f"--weights-dtype {args.weights_dtype} --out pipeline/assets/demo-teacher (EMA weights)",
        "guide": (
            {"step": args.guide_step, "weight": args.guide_weight, "run": args.run}
            if args.guide_step is not None
            else None
        ),
        "hardware": {
            "cpu": machine_cpu(),
            "cores": os.cpu_count(),
            "gpu": None,
            "note": args.note,
        },
        "steps": args.step,
        "batch_size": args.batch_size,
        "wall_minutes_to_step": args.wall_minutes,
        "mlflow_run_id": args.run,
        "metrics": metrics,
    }
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri")
    ap.add_argument("--run", help="MLflow run id of `omniforcing train teacher`")
    ap.add_argument("--step", type=int, help="the exported checkpoint's step")
    ap.add_argument("--wall-minutes", type=float)
    ap.add_argument(
        "--extend",
        type=Path,
        help="a training.json written before: its record, the run's histories included, is the "
        "base the --fine-tune sections are appended to (no MLflow store needed)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--guide-step", type=int, help="autoguidance: the guide checkpoint's step")
    ap.add_argument("--guide-weight", type=float, default=1.0)
    ap.add_argument("--weights-dtype", default="float32", help="as given to omniforcing export")
    ap.add_argument(
        "--stagger",
        type=float,
        help="as given to omniforcing export: the sampler's Δ (recorded, and in `exported`)",
    )
    ap.add_argument("--note", default="", help="hardware sharing, interruptions, resumes")
    ap.add_argument(
        "--fine-tune",
        type=Path,
        action="append",
        default=[],
        help="a `pipeline.single train --init` output (weights prefix) that continued --step, or "
        "the fine-tune given before it; repeat in training order",
    )
    ap.add_argument("--out", type=Path, default=Path("pipeline/assets/demo-teacher-record"))
    args = ap.parse_args()

    from benchmarks.report import write_atomic
    from pipeline.plots import loss_curve

    if args.extend is not None:
        if not args.fine_tune:
            ap.error("--extend needs at least one --fine-tune to append")
        if not args.extend.is_file():
            ap.error(f"--extend {args.extend}: no such training.json")
        record = json.loads(args.extend.read_text())
        # Its `exported` line already reads `pipeline.single export` + `omniforcing export`.
        record["hardware"]["note"] = " ".join(
            x for x in (record["hardware"]["note"], args.note) if x
        )
    else:
        missing = [
            o for o in ("tracking_uri", "run", "step", "wall_minutes") if getattr(args, o) is None
        ]
        if missing:
            ap.error(
                "without --extend these are required: "
                + ", ".join("--" + o.replace("_", "-") for o in missing)
            )
        record = base_record(args)
    for prefix in args.fine_tune:
        fine_tune(record, prefix)
    if args.stagger is not None:
        record["sampler"] = {"stagger": args.stagger}
        head, sep, tail = record["exported"].partition(" --out pipeline/assets/demo-teacher")
        head = head.split(" --stagger ")[0]  # a re-export replaces the Δ recorded before
        record["exported"] = f"{head} --stagger {args.stagger:g}{sep}{tail}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "training.json", json.dumps(record, indent=1))
    metrics = record["metrics"]
    loss_curve({k: metrics[k] for k in ("loss/video", "loss/audio")}, args.out / "loss.png")
    loss_curve(
        {k: metrics[k] for k in RELIANCE},
        args.out / "reliance.png",
        "cross-modal reliance (loss with the other stream shuffled − paired)",
    )
    print(f"wrote {args.out}/training.json, loss.png, reliance.png ({record['steps']} steps)")


if __name__ == "__main__":
    main()
