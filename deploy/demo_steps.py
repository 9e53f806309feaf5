"""The steps `omniforcing demo` runs, in order: data, an optional scratch teacher, distillation,
serving and the teacher-vs-student evaluation.

Each step is a function of paths and configs that returns where its output went; the command,
its options and the final summary live in `deploy/demo.py`. No algorithm of its own lives here:
the steps call `data`, `pipeline` and `deploy` (the CLI's composition root).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
# The final comparison's prompts and seeds (clip i: 1000 + i), apart from the fidelity set
# (train.fidelity.seed, 10000 + i) that picks the promoted step under `--sf-evals`.
EVAL_SEED = 1000


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def prepare_shards(out: Path, clips: int, seconds: float, seed: int, hw: tuple = (64, 64)) -> Path:
    """One-ball world shards at out/shards (kept if present)."""
    from data.synth import synth

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
    exported Bundle downloaded to root/teacher; returns the Bundle's folder. The shipped teacher
    took hours of 2-core time: see pipeline/assets/demo-teacher-record/."""
    from data.inspect import fit_codec
    from pipeline.commands import progress_from_mlflow
    from pipeline.config import load_config
    from pipeline.registry import bundle_dir
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
    step("fit the codecs on the shards")
    fit_codec(str(root / "shards"), str(root / "codecs"), 256, grid=mcfg.video_latent_hw[0])
    step(f"train teacher ({tcfg.train.steps} steps)")
    with progress_from_mlflow(tcfg, "teacher"):
        run_id = run_stage(tcfg, "teacher").run_id
    # Download only (the distillation loads it): the registry finds the Bundle folder inside.
    return str(bundle_dir(f"runs:/{run_id}/bundle", dst=root / "teacher"))


def distill(
    cfg: Any, teacher_ref: str, ode_steps: int, sf_steps: int, sf: dict[str, Any] | None = None
) -> dict[str, str]:
    """Run `ode` then `self-forcing` (initialised from the ODE student) under one parent run;
    `sf`: `stage_config`'s Self-Forcing options (lr, batch, scope, evals, eval_clips)."""
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
    with tracking.run_status(client, parent):  # FINISHED, FAILED or KILLED in MLflow
        for stage, steps in (("ode", ode_steps), ("self-forcing", sf_steps)):
            step(f"train {stage} ({steps} steps)")
            stage_cfg = validate(stage_config(base, stage, steps, runs.get("ode"), **(sf or {})))
            with progress_from_mlflow(stage_cfg, stage):
                runs[stage] = run_stage(stage_cfg, stage, parent_run=parent).run_id
    return runs


def stage_config(
    base: dict[str, Any],
    stage: str,
    steps: int,
    ode_run: str | None = None,
    lr: float | None = None,
    evals: int = 0,
    eval_clips: int = 8,
    batch: int | None = None,
    scope: str | None = None,
) -> dict[str, Any]:
    """The demo's config of one distillation stage: `steps` optimizer steps, warm-up capped at a
    tenth of them. Self-Forcing: the student initialised from the ODE run, at `lr` (critic too,
    unless the config sets `distill.critic_lr`), `batch` clips per worker, `distill.loss_scope`
    `scope` (None: the config's), and — unless the config already schedules
    `train.fidelity` — evaluated on `eval_clips` fixed prompts at its start and `evals` times
    after, so `promote` registers the best of those (the start included: a Self-Forcing stage
    that only makes its student worse promotes the ODE student it began from)."""
    d = json.loads(json.dumps(base))
    d["train"]["steps"] = steps
    # configs/demo.yaml's warm-up (100) is sized for its 2000 steps: at the demo's 40
    # Self-Forcing steps the whole stage ran inside it, never at the configured rate.
    d["train"]["warmup_steps"] = min(d["train"]["warmup_steps"], max(1, steps // 10))
    if stage == "self-forcing":
        d["distill"]["student"]["init_from"] = ode_run
        if lr is not None:
            d["train"]["lr"] = lr
        if batch is not None:
            d["data"]["batch_size"] = batch
        if scope is not None:
            d["distill"]["loss_scope"] = scope
        fid = d["train"].setdefault("fidelity", {})
        if evals and not fid.get("every"):
            # The demo compares teacher and student at its end: no teacher line here (saves
            # the teacher's 8 clips at its 120 forwards each).
            # at_start: the ODE student it starts from competes as step 0.
            fid |= {"every": max(1, steps // evals), "clips": eval_clips, "teacher": False,
                    "at_start": True}  # fmt: skip
    return d


def serve_and_stream(uri: str, prompt: str, seconds: int, seed: int, clip: Path) -> dict:
    """Serve `uri` on a free local port and stream one clip to `clip`; the stream's stats."""
    from data.local_s3 import free_port
    from deploy.cli import start_serve
    from deploy.client import save_stream, stream_http

    port = free_port()
    start_serve(uri, port=port, max_streams=2, max_seconds=max(seconds, 10))
    url = f"http://127.0.0.1:{port}"
    stats = save_stream(stream_http(url, prompt, seconds, seed), clip)
    return {"url": url, **stats.summary()}


def compare(
    teacher_dir: str, student_uri: str, n: int, seconds: int, out: Path, run_id: str
) -> dict:
    """Teacher and student on the same one-ball world prompts and seeds (so caption adherence
    counts), beside the real clips of those prompts and their codec round trip (what a model can
    at best show): the same report as `omniforcing eval --compare`: table, eval/eval.json,
    eval/eval.png (real / codec / teacher / student frames over each waveform, contacts marked),
    all logged to the demo's parent MLflow run."""
    from pipeline import eval_commands, evaluate
    from pipeline.registry import load_bundle

    bundles = {"teacher": load_bundle(teacher_dir), "student": load_bundle(student_uri)}
    cfg = bundles["teacher"].config
    truth = evaluate.world_clips(n, seconds, EVAL_SEED, cfg.height, cfg.width, max_balls=1)
    prompts = [c.meta["caption"] for c in truth]
    sets = {"real": truth, "codec": evaluate.ceiling(bundles["teacher"], truth)}
    sets |= {k: evaluate.generate(b, prompts, seconds, seed=EVAL_SEED) for k, b in bundles.items()}
    reports = {k: evaluate.evaluate(clips) for k, clips in sets.items()}
    console.print(eval_commands.report_table(reports, "teacher vs student (same prompts, seeds)"))
    files = [
        eval_commands.write_json(reports, out / "eval" / "eval.json"),
        eval_commands.plot_clips(sets, reports, out / "eval" / "eval.png"),
    ]
    eval_commands.log_to_mlflow(run_id, reports, files)
    return {k: {m: v for m, v in r.items() if m != "clips"} for k, r in reports.items()}
