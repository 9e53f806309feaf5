"""`omniforcing eval` and `omniforcing check`: CLI wiring, report table, PNG, JSON, MLflow.

`register(app)` adds both commands (pipeline/cli.py calls it). The measurements live in
pipeline/evaluate.py and the pre-flight checks in pipeline/check.py; this file only chooses the
clip source, renders results (rich table; PNG of frames over the waveform with contacts and
onsets marked; JSON written atomically) and logs them to an MLflow run when asked.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from pipeline import evaluate as ev

# (report key, label, format) in table order; missing keys print as "-".
ROWS = (
    ("n_clips", "clips", "{:.0f}"),
    ("median_offset_ms", "sync error median (ms)", "{:.1f}"),
    ("p90_offset_ms", "sync error p90 (ms)", "{:.1f}"),
    ("contact_recall", "contacts with onset <= 40 ms", "{:.1%}"),
    ("contact_recall_lo", "  95% interval (clips resampled)", "interval"),
    ("chance_recall", "  shuffled-pair chance", "{:.1%}"),
    ("reversal_recall", "  every reversal (open space too)", "{:.1%}"),
    ("onset_precision", "onsets near a contact", "{:.1%}"),
    ("contacts_per_clip", "visible contacts per clip", "{:.1f}"),
    ("reversals_per_clip", "reversals per clip", "{:.1f}"),
    ("speed_px_s", "ball speed (px/s)", "{:.1f}"),
    ("wall_frac", "reversals at a wall", "{:.1%}"),
    ("ball_visible_frac", "frames with a visible ball", "{:.1%}"),
    ("ball_contrast", "ball peak contrast (0-1)", "{:.2f}"),
    ("ball_radius_px", "ball radius (px)", "{:.1f}"),
    ("colour_acc", "caption colour", "{:.1%}"),
    ("pitch_acc", "caption pitch", "{:.1%}"),
    ("direction_acc", "caption direction", "{:.1%}"),
    ("gen_s_per_s", "generation s per s of content", "{:.2f}"),
)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(report: dict[str, Any], key: str, fmt: str) -> str:
    if fmt == "interval":  # key is the low end; the high end is its `_hi` sibling
        lo, hi = report.get(key), report.get(key.removesuffix("_lo") + "_hi")
        return "-" if _missing(lo) or _missing(hi) else f"{lo:.1%} – {hi:.1%}"
    value = report.get(key)
    return "-" if _missing(value) else fmt.format(value)


def report_table(reports: dict[str, dict[str, Any]], title: str = "omniforcing eval") -> Table:
    """One column per report (e.g. teacher, student, ceiling), one row per metric."""
    table = Table(title=title)
    table.add_column("metric")
    for name in reports:
        table.add_column(name, justify="right")
    for key, label, fmt in ROWS:
        if any(key in r for r in reports.values()):
            table.add_row(label, *(_cell(r, key, fmt) for r in reports.values()))
    return table


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)  # atomic
    return path


def plot_clips(sets: dict[str, list[ev.EvalClip]], reports: dict[str, dict], path: Path) -> Path:
    """Per set, its first clip: 8 frames in a strip over the waveform; contacts (blue), open-space
    reversals (blue dotted) and onsets (red dashed) marked on its time axis. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sets)
    fig, axes = plt.subplots(2 * n, 1, figsize=(10, 3.2 * n), dpi=90, squeeze=False)
    for i, (name, clips) in enumerate(sets.items()):
        clip, row = clips[0], reports[name]["clips"][0]
        f = clip.frames  # uint8 [F, H, W, 3]
        pick = np.linspace(0, len(f) - 1, 8).round().astype(int)
        axes[2 * i, 0].imshow(np.concatenate([f[j] for j in pick], axis=1))
        axes[2 * i, 0].set_title(
            f"{name}: {clip.key}  {clip.meta.get('caption', '')[:90]}", fontsize=8
        )
        axes[2 * i, 0].axis("off")
        sr = int(clip.meta.get("sample_rate", 16000))
        wave = np.asarray(clip.audio, dtype=np.float32).mean(0)  # mono [S]
        ax = axes[2 * i + 1, 0]
        ax.plot(np.arange(len(wave)) / sr, wave, color="0.3", linewidth=0.5)
        for t in row["contacts"]:
            ax.axvline(t, color="tab:blue", linewidth=1.0)
        for t in set(row["reversals"]) - set(row["contacts"]):
            ax.axvline(t, color="tab:blue", linewidth=0.8, linestyle=":")
        for t in row["onsets"]:
            ax.axvline(t, color="tab:red", linewidth=1.0, linestyle="--")
        ax.set_xlim(0, len(wave) / sr)
        ax.set_xlabel(
            "s (blue: visible contacts, blue dotted: open-space reversals, red dashed: onsets)",
            fontsize=8,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def log_to_mlflow(run_id: str, reports: dict[str, dict], files: list[Path]) -> None:
    """Metrics as eval/<set>/<key> and the PNG + JSON as artifacts under eval/."""
    import time

    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    ts = int(time.time() * 1000)
    metrics = [
        Metric(f"eval.{name}.{k}", float(v), ts, 0)
        for name, r in reports.items()
        for k, v in r.items()
        if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))
    ]
    for i in range(0, len(metrics), 1000):  # one request (MLflow caps a batch at 1000)
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for f in files:
        client.log_artifact(run_id, str(f), "eval")


def _load(ref: str, option: str) -> Any:
    """A Bundle from a folder, `shipped` (the packaged demo teacher), a run id or a models:/ or
    runs:/ URI, as the distillation roles resolve them; a failure names the option and the
    reference."""
    from pipeline.distill.roles import load_bundle_ref

    try:
        return load_bundle_ref(ref, option)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{option} {ref!r}: {err}") from None


def collect(
    inputs: list[str],
    model: str | None,
    compare: tuple[str, str] | None,
    shards: str | None,
    clips: int,
    seconds: int,
    seed: int,
    want_ceiling: bool,
    teacher_steps: int = 40,
    balls: int = 1,
) -> dict[str, list[ev.EvalClip]]:
    """The named clip sets to evaluate, from exactly one source."""
    given = [bool(inputs), bool(model), bool(compare), bool(shards)]
    if sum(given) != 1:
        raise typer.BadParameter(
            "give exactly one source: mp4 PATHS, --model, --compare TEACHER STUDENT or --shards"
        )
    sets: dict[str, list[ev.EvalClip]] = {}
    codec_bundle = None
    if inputs:
        sets["clips"] = ev.clips_from_mp4(inputs)
        truth = sets["clips"]
    elif shards:
        sets["shards"] = ev.clips_from_shards(shards, clips)
        truth = sets["shards"]
    else:
        named = {"teacher": compare[0], "student": compare[1]} if compare else {"model": model}
        opt = "--compare" if compare else "--model"
        bundles = {name: _load(ref, opt) for name, ref in named.items()}
        cfg = next(iter(bundles.values())).config
        truth = ev.world_clips(clips, seconds, seed, cfg.height, cfg.width, balls)
        prompts = [c.meta["caption"] for c in truth]
        for name, bundle in bundles.items():
            sets[name] = ev.generate(bundle, prompts, seconds, seed, teacher_steps)
        codec_bundle = list(bundles.values())[-1]
    if want_ceiling:
        if codec_bundle is None:
            if not model:
                raise typer.BadParameter("--ceiling needs codecs: add --model <bundle>")
            codec_bundle = _load(model, "--model")
        sets["ceiling"] = ev.ceiling(codec_bundle, truth)
    return sets


def eval_cmd(
    paths: list[str] = typer.Argument(None, help="mp4 files, folders or globs (+ sidecar .json)."),
    model: str | None = typer.Option(
        None, help="Bundle dir, `shipped`, a run id or models:/name@alias to generate."
    ),
    compare: tuple[str, str] | None = typer.Option(
        None, help="TEACHER STUDENT bundles: same prompts and seeds, side by side."
    ),
    shards: str | None = typer.Option(None, help="Ground-truth clips from shards (dir or s3://)."),
    clips: int = typer.Option(4, min=1, help="Clips to generate (or read from shards)."),
    seconds: int = typer.Option(2, min=1, help="Seconds per generated clip."),
    seed: int = typer.Option(0, help="Clip i uses seed + i (prompt = render_clip(seed + i))."),
    ceiling: bool = typer.Option(False, help="Also score ground truth through the codecs."),
    out: Path = typer.Option(Path("eval-out"), help="Folder for eval.json and eval.png."),
    mlflow_run: str | None = typer.Option(None, help="Log metrics and files to this run."),
    tol_ms: float = typer.Option(40.0, help="Sync tolerance in ms."),
    teacher_steps: int = typer.Option(40, min=1, help="Euler steps of a bidirectional teacher."),
    balls: int = typer.Option(
        1, min=1, max=4, help="Most balls per prompt clip: the world the model was trained on."
    ),
) -> None:
    """Sync error, share in sync vs chance, motion and caption adherence of world clips."""
    from pipeline.commands import user_errors

    if paths == []:
        paths = None
    with user_errors():
        sets = collect(
            paths or [], model, compare, shards, clips, seconds, seed, ceiling, teacher_steps, balls
        )
    reports = {name: ev.evaluate(cs, tol_ms / 1e3) for name, cs in sets.items()}
    Console().print(report_table(reports))
    files = [write_json(reports, out / "eval.json"), plot_clips(sets, reports, out / "eval.png")]
    typer.echo(f"wrote {files[0]} and {files[1]}")
    if mlflow_run:
        log_to_mlflow(mlflow_run, reports, files)
        typer.echo(f"logged to MLflow run {mlflow_run}")


def check_cmd(
    config: str = typer.Option(..., help="Job config YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: a.b=c (repeatable)."),
    timeout: float = typer.Option(3.0, help="Seconds per network check."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (e.g. auto)."),
) -> None:
    """Validate the config, reach storage, MLflow and the Ray cluster, and print the memory plan
    per rank and per actor; exit 1 on a failure (a plan over scaling.gpu_memory_gb included)."""
    from pipeline.check import run_checks

    lines = run_checks(config, set_, timeout, ray_address)
    table = Table(title=f"omniforcing check {config}")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for line in lines:
        mark = "[green]ok[/green]" if line.ok else "[red]FAIL[/red]"
        table.add_row(line.name, mark, line.detail)
    Console(width=160).print(table)
    for line in lines:
        for text in line.table:  # e.g. the memory plan of a stage
            typer.echo(text)
    if not all(line.ok for line in lines):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("check")(check_cmd)
