"""CLI commands of the training platform: `train`, `pipeline`, `promote`, `runs`.

`register(app)` adds them to the root `omniforcing` Typer app (pipeline/cli.py). User errors
(config keys, incompatible resume, unpromotable run) are printed as one clean message with exit
code 2, never a traceback. Long work shows a rich progress bar fed from the run's MLflow metrics.
It holds no training logic (pipeline.trainer) and no registry logic (pipeline.registry).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import ConfigError, JobConfig, load_config

console = Console(stderr=True)

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="YAML job config.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: a.b=c (repeatable).")
]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ConfigError/ValueError/FileNotFoundError cleanly and exit 2; a failed training
    job (pipeline.trainer.TrainingFailed: run, last checkpoint, reason) the same way, exit 1."""
    try:
        yield
    except (ConfigError, ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except RuntimeError as err:
        from pipeline.trainer import TrainingFailed  # imported only when something failed

        if not isinstance(err, TrainingFailed):
            raise
        console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
        raise typer.Exit(1) from None


@contextlib.contextmanager
def progress_from_mlflow(cfg: JobConfig, label: str) -> Iterator[None]:
    """A progress bar of the newest run's logged steps, polled in a thread while work runs."""
    from pipeline import tracking

    stop = threading.Event()
    client = tracking.client_for(tracking.tracking_uri(cfg))

    def poll(bar: Progress, task: Any) -> None:
        while not stop.wait(2.0):
            with contextlib.suppress(Exception):
                run = tracking.find_run(client, cfg.mlflow.experiment, "latest", label)
                hist = client.get_metric_history(run.info.run_id, "loss")
                bar.update(task, completed=max((m.step for m in hist), default=0))

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"train {label}", total=cfg.train.steps)
        thread = threading.Thread(target=poll, args=(bar, task), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()


def train(
    stage: Annotated[str, typer.Argument(help="teacher | ode | self-forcing")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[str | None, typer.Option("--resume", help="latest | <mlflow-run-id>")] = None,
) -> None:
    """Train one stage as a Ray Train job (DeepSpeed ZeRO), tracked in MLflow."""
    from pipeline.tracking import sigterm_as_interrupt
    from pipeline.trainer import run_stage

    with user_errors(), sigterm_as_interrupt():
        cfg = load_config(config, set_ or [])
        with progress_from_mlflow(cfg, stage):
            result = run_stage(cfg, stage, resume=resume)
    console.print(
        f"[green]{stage} done[/]: run {result.run_id}, step {result.step}, checkpoint {result.checkpoint_uri}"
    )


def pipeline(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """All available stages in order under one parent run; finished stages are skipped."""
    from pipeline import tracking
    from pipeline.stages import available_stages

    with user_errors(), tracking.sigterm_as_interrupt():
        cfg = load_config(config, set_ or [])
        client = tracking.client_for(tracking.tracking_uri(cfg))
        exp = tracking.experiment_id(client, cfg.mlflow.experiment)
        parent = client.create_run(
            exp, tags={"mlflow.runName": "pipeline", tracking.STAGE_TAG: "pipeline"}
        ).info.run_id
        with tracking.run_status(client, parent):  # FINISHED, FAILED or KILLED
            _stages(client, exp, cfg, parent, available_stages())


def _stages(client: Any, exp: str, cfg: JobConfig, parent: str, stages: list[str]) -> None:
    """The pipeline's stages in order, each fed the run ids of the ones before it."""
    from pipeline.config import validate

    for stage in stages:
        run_id = _run_or_skip(client, exp, cfg, stage, parent)
        d = cfg.to_dict()
        if stage == "teacher" and cfg.distill.teacher is None:
            # The distillation stages score with the teacher this pipeline just trained.
            d["distill"]["teacher"] = run_id
        elif stage == "ode" and cfg.distill.student.init_from == "teacher":
            # Self-Forcing starts from the ODE-initialised student (the paper's stage 3).
            d["distill"]["student"]["init_from"] = run_id
        cfg = validate(d)


def _run_or_skip(client: Any, exp: str, cfg: JobConfig, stage: str, parent: str) -> str:
    """Run one pipeline stage: skip it if a finished run with this fingerprint exists, resume
    an unfinished one that has a checkpoint, else start it. Returns the stage's run id."""
    from pipeline import tracking
    from pipeline.fingerprint import fingerprint
    from pipeline.trainer import run_stage

    filt = f"tags.`{tracking.STAGE_TAG}` = '{stage}' AND tags.`{tracking.FINGERPRINT_TAG}` = '{fingerprint(cfg)}'"
    prior = client.search_runs([exp], filt, order_by=["attributes.start_time DESC"], max_results=1)
    if prior and prior[0].data.tags.get(tracking.STATUS_TAG) == "finished":
        console.print(f"skip {stage}: finished in run {prior[0].info.run_id}")
        return prior[0].info.run_id
    resume = prior[0].info.run_id if prior and prior[0].data.tags.get(tracking.CKPT_TAG) else None
    with progress_from_mlflow(cfg, stage):
        result = run_stage(cfg, stage, resume=resume, parent_run=parent)
    console.print(f"[green]{stage} done[/]: run {result.run_id}, step {result.step}")
    return result.run_id


def promote_cmd(
    run: Annotated[str, typer.Option("--run", help="MLflow run id or 'latest'.")] = "latest",
    name: Annotated[str, typer.Option(help="Registered model name.")] = "omniforcing-student",
    alias: Annotated[str, typer.Option(help="Alias to move to the new version.")] = "champion",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    last: Annotated[
        bool, typer.Option("--last", help="The final export, not the best evaluated step.")
    ] = False,
) -> None:
    """Register a finished student's Bundle in the MLflow registry and set the alias: the best
    step by `train.fidelity.best_by` when the run evaluated any (else the last), saying which."""
    from pipeline import tracking
    from pipeline.registry import promote

    with user_errors():
        cfg = load_config(config, set_ or [])
        uri = tracking.tracking_uri(cfg)
        which = "last" if last else "best"
        out = promote(run, name, alias, uri, cfg.mlflow.experiment, which=which)
    console.print(
        f"[green]promoted[/] {out['uri']} (version {out['version']}) ← {out['description']}"
    )


def runs(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    limit: Annotated[int, typer.Option(help="Rows.")] = 20,
) -> None:
    """List runs: id, stage, last step, MLflow's status, ours (published?), checkpoint."""
    from pipeline import tracking

    with user_errors():
        cfg = load_config(config, set_ or [])
        client = tracking.client_for(tracking.tracking_uri(cfg))
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        found = (
            client.search_runs(
                [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit
            )
            if exp
            else []
        )
    # MLflow's status (RUNNING also for a job killed outright: nobody was left to close it) and
    # ours ("finished" only once the final export was published: what promote needs).
    table = Table("run", "stage", "step", "mlflow", "omniforcing", "checkpoint")
    for r in found:
        tags = r.data.tags
        step = tags.get(tracking.CKPT_STEP_TAG, "-")
        table.add_row(
            r.info.run_id,
            tags.get(tracking.STAGE_TAG, "-"),
            step,
            r.info.status,
            tags.get(tracking.STATUS_TAG, "-"),
            tags.get(tracking.CKPT_TAG, "-"),
        )
    Console().print(table)


def export_cmd(
    checkpoint: Annotated[
        str, typer.Option(help="A teacher checkpoint folder (step-…) or a teacher bundle.")
    ],
    out: Annotated[str, typer.Option(help="Bundle folder to write.")],
    guide: Annotated[
        str | None,
        typer.Option(
            help="Autoguidance: a weaker teacher (an earlier checkpoint of the run, or a bundle) "
            "the samplers push away from."
        ),
    ] = None,
    guide_weight: Annotated[float, typer.Option(help="Autoguidance weight w.")] = 1.0,
    weights_dtype: Annotated[
        str, typer.Option(help="DiT weights on disk: float32, float16 or bfloat16.")
    ] = "float32",
    stagger: Annotated[
        float | None,
        typer.Option(
            help="The teacher sampler's Δ: frames on a staggered schedule, earlier ones cleaner "
            "(for a teacher trained with train.sigma.stagger); 0 = joint. Default: the bundle's."
        ),
    ] = None,
) -> None:
    """Export a teacher checkpoint's EMA weights + codecs + text encoder as a Bundle."""
    from pipeline.export import export_checkpoint

    with user_errors():
        path = export_checkpoint(checkpoint, out, guide, guide_weight, weights_dtype, stagger)
    console.print(f"[green]exported[/] {path}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("pipeline")(pipeline)
    app.command("promote")(promote_cmd)
    app.command("runs")(runs)
    app.command("export")(export_cmd)
