"""`omniforcing demo`: the embedded default end to end, in one command.

synthetic shards → shipped demo teacher (or `--teacher scratch`) → `ode` → `self-forcing` (real
Ray Train + DeepSpeed jobs, tracked in MLflow under one parent run) → registry promotion →
Ray Serve endpoint → `clip.mp4` streamed over HTTP → teacher-vs-student evaluation → summary.
It lives in `deploy/` because it composes every layer (the CLI's composition root); it holds no
algorithm of its own, only the order of the steps and where their outputs go.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo-teacher"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def prepare_shards(out: Path, clips: int, seconds: float, seed: int, hw: tuple = (64, 64)) -> Path:
    """One-ball world shards at out/shards (kept if present)."""
    from data.shards import synth

    shards = out / "shards"
    if not (shards / "index.json").is_file():
        synth(str(shards), clips, seconds, 64, seed, hw[0], hw[1], max_balls=1)
    return shards


def prepare_data(out: Path, clips: int, seconds: float, teacher: Any, seed: int) -> Path:
    """Shards at out/shards (kept if present) and the teacher's codecs at out/codecs."""
    from model.codecs import save_codecs

    cfg = teacher.config
    shards = prepare_shards(out, clips, seconds, seed, (cfg.height, cfg.width))
    save_codecs(out / "codecs", teacher.video_codec, teacher.audio_codec)
    return shards


def train_teacher(
    root: Path, cfg: Any, config: str, steps: int | None, clips: int, seconds: float
) -> str:
    """`--teacher scratch`: one-ball shards, codecs fitted on them at the teacher preset's grid, a
    teacher trained with `config` (configs/demo-teacher.yaml) under the demo's MLflow store, its
    exported Bundle downloaded to root/teacher (returned). The shipped teacher took hours of
    2-core time: see pipeline/assets/demo-teacher-record/."""
    from data.inspect import fit_codec
    from pipeline.commands import progress_from_mlflow
    from pipeline.config import load_config
    from pipeline.registry import load_bundle
    from pipeline.trainer import run_stage

    overrides = [
        "data.source=shards",
        f"data.path={root / 'shards'}",
        f"data.codec_dir={root / 'codecs'}",
        f"storage.path={root / 'checkpoints'}",
        f"mlflow.experiment={cfg.mlflow.experiment}",
    ]
    tcfg = load_config(config, overrides + ([f"train.steps={steps}"] if steps else []))
    mcfg = tcfg.build_model_config(causal=False)
    prepare_shards(root, clips, seconds, tcfg.train.seed, (mcfg.height, mcfg.width))
    _step("fit the codecs on the shards")
    fit_codec(str(root / "shards"), str(root / "codecs"), 256, grid=mcfg.video_latent_hw[0])
    _step(f"train teacher ({tcfg.train.steps} steps)")
    with progress_from_mlflow(tcfg, "teacher"):
        run_id = run_stage(tcfg, "teacher").run_id
    dst = root / "teacher"
    load_bundle(f"runs:/{run_id}/bundle", dst=dst)
    return str(next(p.parent for p in dst.rglob("config.json")))


def distill(cfg: Any, teacher_ref: str, ode_steps: int, sf_steps: int) -> dict[str, str]:
    """Run `ode` then `self-forcing` (initialised from the ODE student) under one parent run."""
    from pipeline import tracking
    from pipeline.commands import progress_from_mlflow
    from pipeline.config import validate
    from pipeline.trainer import run_stage

    client = tracking.client_for(tracking.tracking_uri(cfg))
    exp = tracking.experiment_id(client, cfg.mlflow.experiment)
    parent = client.create_run(
        exp, tags={"mlflow.runName": "demo-pipeline", tracking.STAGE_TAG: "pipeline"}
    ).info.run_id
    base = cfg.to_dict()
    base["distill"]["teacher"] = teacher_ref
    runs: dict[str, str] = {"parent": parent}
    for stage, steps in (("ode", ode_steps), ("self-forcing", sf_steps)):
        d = json.loads(json.dumps(base))
        d["train"]["steps"] = steps
        if stage == "self-forcing":
            d["distill"]["student"]["init_from"] = runs["ode"]
        _step(f"train {stage} ({steps} steps)")
        stage_cfg = validate(d)
        with progress_from_mlflow(stage_cfg, stage):
            runs[stage] = run_stage(stage_cfg, stage, parent_run=parent).run_id
    client.set_terminated(parent)
    return runs


def serve_and_stream(uri: str, prompt: str, seconds: int, seed: int, clip: Path) -> dict:
    from deploy.cli import start_serve
    from deploy.client import save_stream, stream_http

    port = _free_port()
    start_serve(uri, port=port, max_streams=2, max_seconds=max(seconds, 10))
    url = f"http://127.0.0.1:{port}"
    stats = save_stream(stream_http(url, prompt, seconds, seed), clip)
    return {"url": url, **stats.summary()}


def compare(
    teacher_dir: str, student_uri: str, n: int, seconds: int, out: Path, run_id: str
) -> dict:
    """Teacher and student on the same one-ball world prompts and seeds (so caption adherence
    counts), the same report as `omniforcing eval --compare`: table, eval/eval.json, eval/eval.png
    (frames over waveform, contacts marked), all logged to the demo's parent MLflow run."""
    from pipeline import eval_commands, evaluate
    from pipeline.registry import load_bundle

    bundles = {"teacher": load_bundle(teacher_dir), "student": load_bundle(student_uri)}
    cfg = bundles["teacher"].config
    truth = evaluate.world_clips(n, seconds, 1000, cfg.height, cfg.width, max_balls=1)
    prompts = [c.meta["caption"] for c in truth]
    sets = {k: evaluate.generate(b, prompts, seconds, seed=1000) for k, b in bundles.items()}
    reports = {k: evaluate.evaluate(clips) for k, clips in sets.items()}
    console.print(eval_commands.report_table(reports, "teacher vs student (same prompts, seeds)"))
    files = [
        eval_commands.write_json(reports, out / "eval" / "eval.json"),
        eval_commands.plot_clips(sets, reports, out / "eval" / "eval.png"),
    ]
    eval_commands.log_to_mlflow(run_id, reports, files)
    return {k: {m: v for m, v in r.items() if m != "clips"} for k, r in reports.items()}


def _summary(rows: list[tuple[str, str]]) -> dict[str, str]:
    table = Table(title="OmniForcing demo", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return dict(rows)


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
    sf_steps: Annotated[int, typer.Option(min=1)] = 40,
    prompt: Annotated[str, typer.Option()] = "a small red ball moving up-left with a high ping",
    seconds: Annotated[int, typer.Option(min=1, help="Length of the streamed clip.")] = 5,
    clip: Annotated[str, typer.Option(help="Where the streamed clip goes.")] = "clip.mp4",
    eval_clips: Annotated[int, typer.Option(min=1)] = 8,
    name: Annotated[str, typer.Option(help="Registered model name.")] = "omniforcing-student",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
) -> None:
    """Synthetic data → teacher → ODE + Self-Forcing student → MLflow → promote → serve → clip."""
    from model import Bundle
    from pipeline.commands import user_errors
    from pipeline.config import load_config
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
        _step("data: synthetic one-ball world")
        if teacher == "scratch":
            secs = cfg.data.seconds + 1 / 24
            teacher = train_teacher(root, cfg, teacher_config, teacher_steps, clips, secs)
        teacher_dir = str(SHIPPED_TEACHER) if teacher == "shipped" else teacher
        tb = Bundle.from_pretrained(teacher_dir)
        prepare_data(root, clips, cfg.data.seconds + 1 / 24, tb, cfg.train.seed)
        runs = distill(cfg, teacher_dir, ode_steps, sf_steps)
        _step("promote the student")
        promoted = promote(
            run=runs["self-forcing"], name=name, tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
            experiment=cfg.mlflow.experiment,
        )  # fmt: skip
        _step(f"serve {promoted['uri']} and stream {seconds} s to {clip}")
        stats = serve_and_stream(promoted["uri"], prompt, seconds, 7, Path(clip))
        _step("evaluate teacher vs student")
        report = compare(teacher_dir, promoted["uri"], eval_clips, seconds, root, runs["parent"])
    t, s = report["teacher"], report["student"]
    rows = _summary(
        [
            ("MLflow", os.environ["MLFLOW_TRACKING_URI"] + f"  (parent run {runs['parent']})"),
            ("model", f"{promoted['uri']} = version {promoted['version']}"),
            ("clip", f"{Path(clip).resolve()}  ({stats.get('frames')} frames)"),
            ("time to first chunk", f"{stats.get('ttfc_s', 0):.2f} s"),
            ("real-time factor", f"{stats.get('rtf', 0):.2f}×"),
            (
                "contacts with onset ≤40 ms",
                f"teacher {_f(t, 'contact_recall')} / student "
                f"{_f(s, 'contact_recall')} (chance {_f(t, 'chance_recall')})",
            ),
            (
                "caption colour / pitch",
                f"teacher {_f(t, 'colour_acc')} / {_f(t, 'pitch_acc')}, student "
                f"{_f(s, 'colour_acc')} / {_f(s, 'pitch_acc')}",
            ),
            ("speed-up student vs teacher", _speedup(t, s)),
            ("teacher vs student report", str(root / "eval" / "eval.png")),
            ("wall time", f"{time.perf_counter() - t0:.0f} s"),
        ]
    )
    summary = {"runs": runs, "promoted": promoted, "stream": stats, "eval": report, "rows": rows}
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _f(report: dict, key: str) -> str:
    v = report.get(key)
    return "n/a" if v is None else f"{float(v):.2f}"


def _speedup(t: dict, s: dict) -> str:
    ts, ss = t.get("gen_s_per_s"), s.get("gen_s_per_s")
    return f"{ts / ss:.1f}×" if ts and ss else "n/a"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
