"""`omniforcing demo`: the embedded default end to end, in one command.

synthetic shards → shipped demo teacher (or `--teacher scratch`) → `ode` → `self-forcing` (real
Ray Train + DeepSpeed jobs, tracked in MLflow under one parent run) → registry promotion →
Ray Serve endpoint → `clip.mp4` streamed over HTTP → teacher-vs-student evaluation → summary.
This file is the command (options, order of the steps) and the summary; the steps themselves
are in `deploy/demo_steps.py`. It lives in `deploy/` because it composes every layer (the CLI's
composition root); it holds no algorithm of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from deploy.demo_steps import (
    compare,
    console,
    distill,
    prepare_data,
    serve_and_stream,
    step,
    train_teacher,
)


def demo(
    out: Annotated[
        str, typer.Option(help="Run folder (shards, checkpoints, MLflow).")
    ] = "runs/demo",
    config: Annotated[str, typer.Option(help="Job config of the student.")] = "configs/demo.yaml",
    teacher: Annotated[
        str, typer.Option(help="'shipped', 'scratch' (train one first) or a teacher Bundle dir.")
    ] = "shipped",
    teacher_config: Annotated[
        str, typer.Option(help="Teacher job config for --teacher scratch.")
    ] = "configs/demo-teacher.yaml",
    teacher_steps: Annotated[
        int | None, typer.Option(min=1, help="Override the scratch teacher's train.steps.")
    ] = None,
    clips: Annotated[int, typer.Option(min=2, help="Synthetic clips to distil on.")] = 64,
    ode_steps: Annotated[int, typer.Option(min=1)] = 150,
    sf_steps: Annotated[int, typer.Option(min=1)] = 16,
    sf_lr: Annotated[
        float,
        typer.Option(min=0.0, help="Self-Forcing's learning rate (the ODE stage's: train.lr)."),
    ] = 1e-4,
    sf_batch: Annotated[
        int | None,
        typer.Option(
            min=1, help="Self-Forcing clips per worker (the ODE stage's: data.batch_size)."
        ),
    ] = None,
    sf_scope: Annotated[
        str | None,
        typer.Option(help="Self-Forcing's distill.loss_scope: every_block | last_block."),
    ] = None,
    sf_evals: Annotated[
        int,
        typer.Option(
            min=0,
            help="Evaluations of the Self-Forcing student (8 clips each) after its start; the "
            "best of them and the start is promoted. 0: none, the last step is promoted (8 "
            "clips are ±10 points: a curve to watch, too few to pick by; RESULTS, session 21).",
        ),
    ] = 0,
    prompt: Annotated[str, typer.Option()] = "a small red ball moving up-left with a high ping",
    seconds: Annotated[int, typer.Option(min=1, help="Length of the streamed clip.")] = 5,
    clip: Annotated[str, typer.Option(help="Where the streamed clip goes.")] = "clip.mp4",
    eval_clips: Annotated[int, typer.Option(min=1)] = 8,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "omniforcing-student",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
) -> None:
    """Synthetic data → teacher → ODE + Self-Forcing student → MLflow → promote → serve → clip."""
    from pipeline.commands import user_errors
    from pipeline.config import load_config
    from pipeline.distill import roles
    from pipeline.registry import promote

    t0 = time.perf_counter()
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with user_errors():
        overrides = [
            f"data.path={root / 'shards'}",
            f"data.codec_dir={root / 'codecs'}",
            f"storage.path={root / 'checkpoints'}",
            *(set_ or []),
        ]
        cfg = load_config(config, overrides)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        step("data: synthetic one-ball world")
        if teacher == "scratch":
            secs = cfg.data.seconds + 1 / 24
            teacher = train_teacher(root, cfg, teacher_config, teacher_steps, clips, secs)
        teacher_dir = roles.bundle_uri(teacher)  # `shipped` → the packaged demo teacher
        tb = roles.load_bundle_ref(teacher_dir, "--teacher")
        prepare_data(root, clips, cfg.data.seconds + 1 / 24, tb, cfg.train.seed)
        sf = {"lr": sf_lr, "evals": sf_evals, "batch": sf_batch, "scope": sf_scope}
        runs = distill(cfg, teacher_dir, ode_steps, sf_steps, sf)
        step("promote the student")
        promoted = promote(
            run=runs["self-forcing"], name=name, tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
            experiment=cfg.mlflow.experiment,
        )  # fmt: skip
        step(f"serve {promoted['uri']} and stream {seconds} s to {clip}")
        stats = serve_and_stream(promoted["uri"], prompt, seconds, 7, Path(clip))
        step("evaluate teacher vs student")
        report = compare(teacher_dir, promoted["uri"], eval_clips, seconds, root, runs["parent"])
    summary = {"runs": runs, "promoted": promoted, "stream": stats, "eval": report}
    summary["rows"] = summarise(summary, root, Path(clip), time.perf_counter() - t0)
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def summarise(summary: dict[str, Any], root: Path, clip: Path, wall_s: float) -> dict[str, str]:
    """Print the demo's summary table; its rows as {label: text} (summary.json's `rows`)."""
    runs, promoted, stats = summary["runs"], summary["promoted"], summary["stream"]
    t, s = summary["eval"]["teacher"], summary["eval"]["student"]
    rows = [
        ("MLflow", os.environ["MLFLOW_TRACKING_URI"] + f"  (parent run {runs['parent']})"),
        ("model", f"{promoted['uri']} = version {promoted['version']}"),
        ("promoted", str(promoted.get("description", ""))),
        ("clip", f"{clip.resolve()}  ({stats.get('frames')} frames)"),
        ("time to first chunk", f"{stats.get('ttfc_s', 0):.2f} s"),
        ("real-time factor", f"{stats.get('rtf', 0):.2f}×"),
        (
            "contacts with onset ≤40 ms",
            f"teacher {_ci(t, 'contact_recall')} / student {_ci(s, 'contact_recall')} "
            f"on {s.get('n_clips', '?')} clips (chance {_f(t, 'chance_recall')})",
        ),
        (
            "caption colour / pitch",
            f"teacher {_f(t, 'colour_acc')} / {_f(t, 'pitch_acc')}, student "
            f"{_f(s, 'colour_acc')} / {_f(s, 'pitch_acc')}",
        ),
        (
            "ball in frames / contrast",
            "  ".join(
                f"{k} {_f(r, 'ball_visible_frac')} / {_f(r, 'ball_contrast')}"
                for k, r in summary["eval"].items()
            ),
        ),
        ("speed-up student vs teacher", _speedup(t, s)),
        ("real / codec / teacher / student", str(root / "eval" / "eval.png")),
        ("wall time", f"{wall_s:.0f} s"),
    ]
    table = Table(title="OmniForcing demo", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return dict(rows)


def _f(report: dict, key: str) -> str:
    v = report.get(key)
    return "n/a" if v is None else f"{float(v):.2f}"


def _ci(report: dict, key: str) -> str:
    """0.62 [0.54, 0.69]: the value and its 95 % interval over resampled clips, where the
    report has one (a few clips make a wide interval: two demos differ by that much)."""
    lo, hi = report.get(f"{key}_lo"), report.get(f"{key}_hi")
    band = "" if lo is None or hi is None else f" [{float(lo):.2f}, {float(hi):.2f}]"
    return _f(report, key) + band


def _speedup(t: dict, s: dict) -> str:
    ts, ss = t.get("gen_s_per_s"), s.get("gen_s_per_s")
    return f"{ts / ss:.1f}×" if ts and ss else "n/a"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
