"""The driver of a training stage: `run_stage(cfg, stage)`.

MLflow run (new or `--resume`d), the dataset (`build_dataset`, shards or random rows, through the
stage's `prepare_dataset` hook), a local Ray instance when no cluster is given (`ensure_ray`), the
stage's driver-side resources (`stage_driver`), the `TorchTrainer` running
`pipeline.worker_loop.train_loop` on every worker, and publishing the export. It holds no loss
(stages do), no worker-side code (pipeline.worker_loop) and no model code.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint as ck
from pipeline import integrity, outbox, tracking
from pipeline.config import JobConfig
from pipeline.fingerprint import resume_diff
from pipeline.stages import get_stage
from pipeline.worker_loop import cpu_threads, train_loop


@dataclass
class StageResult:
    run_id: str
    checkpoint_uri: str | None
    step: int
    tracking_uri: str


def ensure_ray(cfg: JobConfig) -> None:
    """Attach to $RAY_ADDRESS (a cluster job) or start a local instance with enough logical CPUs.

    On a small box the workers' fractional CPUs plus Ray Data tasks must fit, so the local
    instance over-provisions logical CPUs (they are a scheduling unit, not a core count). GPUs
    are not: Ray detects the real cards and hands each GPU worker or teacher actor one of them
    through CUDA_VISIBLE_DEVICES, so invented ones would be devices that do not exist
    (`omniforcing check` compares what the job asks for with what there is).
    """
    import ray

    if ray.is_initialized():
        return
    # Every worker process of the job installs the busy-box guard (pipeline/ray_patches.py).
    # Ray Data's split coordinator logs three INFO lines per epoch per stage into the job's
    # console; WARNING keeps errors and warnings (set RAY_DATA_LOG_LEVEL to see the rest).
    level = os.environ.get("RAY_DATA_LOG_LEVEL", "WARNING")
    env = {
        "worker_process_setup_hook": "pipeline.ray_patches.install",
        "env_vars": {"RAY_DATA_LOG_LEVEL": level},
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env)
        return
    from data.ray_data import local_system_config

    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2
    need += cfg.distill.actor_resources()[0]  # teacher actors (ode pool or real-score pool)
    need += cfg.data.codec_actors * cfg.data.codec_cpus if cfg.data.source == "shards" else 0
    cpus = max(4, int(need + 0.999), os.cpu_count() or 1)
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env=env,
        _system_config=local_system_config(cpus),
    )


def _stage_dataset(cfg: JobConfig, stage: str) -> Any:
    """The job's dataset, passed through the stage's optional driver-side `prepare_dataset`
    hook (e.g. the `ode` stage's teacher-scoring actor pool)."""
    ds = build_dataset(cfg, stage)
    hook = getattr(get_stage(stage), "prepare_dataset", None)
    return hook(ds, cfg) if hook is not None else ds


@contextmanager
def stage_driver(cfg: JobConfig, stage: str) -> Iterator[dict[str, Any]]:
    """The stage's optional driver-side `driver_resources(cfg)` context (e.g. the `self-forcing`
    real-score actor pool), entered before fit() and left after it, failure included. What it
    yields reaches every worker as `WorkerContext.extra` through `loop_cfg["worker_extra"]`,
    outside the config, so it never changes the resume fingerprint."""
    hook = getattr(get_stage(stage), "driver_resources", None)
    if hook is None:
        yield {}
        return
    with hook(cfg) as extra:
        yield dict(extra)


def build_dataset(cfg: JobConfig, stage: str | None = None) -> Any:
    """Rows {key, caption, video [Fv,h,w,C], audio [Fa,C]}: shards (the real path) or random.
    Shards are encoded with the codecs `data.codecs` picks for `stage` (data_codecs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same seed, same batches (determinism)
    ctx.enable_progress_bars = False
    if cfg.data.source == "shards":
        from data.ray_data import latent_dataset
        from pipeline.distill.data_codecs import codec_source

        # S3 endpoint and keys come from the environment (AWS_ENDPOINT_URL, AWS_*), see data/.
        d = cfg.data
        ds = latent_dataset(
            d.path,
            codec_source(cfg, stage),
            actors=d.codec_actors,
            actor_cpus=d.codec_cpus,
            actor_gpus=d.codec_gpus,
            wait_for_min_actors_s=d.actor_start_timeout_s,
        )
        if cfg.data.clips:
            ds = ds.limit(cfg.data.clips)
        return ds.materialize() if cfg.data.cache_latents else ds
    else:
        ds = ray.data.from_items(random_rows(cfg))
    return ds.limit(cfg.data.clips) if cfg.data.clips else ds


def random_rows(cfg: JobConfig) -> list[dict[str, Any]]:
    """Synthetic latents of the preset's shapes: a caption-dependent pattern plus noise, so a
    network can learn something (loss goes down) and text conditioning matters."""
    mcfg = cfg.build_model_config(causal=False)
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    fv = 1 + mcfg.video_block_latents * cfg.data.seconds
    fa = 1 + mcfg.audio_block_latents * cfg.data.seconds
    h, w = mcfg.video_latent_hw
    colours = ["red", "green", "blue", "yellow"]
    bases_v = torch.randn(len(colours), fv, h, w, mcfg.video.latent_channels, generator=g)
    bases_a = torch.randn(len(colours), fa, mcfg.audio.latent_channels, generator=g)
    rows = []
    for i in range(cfg.data.random_clips):
        c = i % len(colours)
        video = bases_v[c] + 0.1 * torch.randn(bases_v[c].shape, generator=g)
        audio = bases_a[c] + 0.1 * torch.randn(bases_a[c].shape, generator=g)
        rows.append(
            {
                "key": f"rand{i:06d}",
                "caption": f"a {colours[c]} ball",
                "video": video.numpy(),
                "audio": audio.numpy(),
            }
        )
    return rows


def worker_env(cfg: JobConfig, tracking_uri: str) -> dict[str, str]:
    """Environment of every Ray Train worker process."""
    cpu = not cfg.scaling.use_gpu
    env = {"OMP_NUM_THREADS": str(cpu_threads(cfg)), "DS_ACCELERATOR": "cpu"} if cpu else {}
    # Workers resolve models:/ and runs:/ references (teacher, ODE student) against the job's
    # tracking server, not whatever default the worker process would pick; their downloads are
    # small and a tqdm bar per worker only clutters the job log (unless the driver asks for it).
    bars = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env | {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": bars}


def _trainer(cfg: JobConfig, loop_cfg: dict[str, Any], ray_name: str, storage: ck.Storage) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = cfg.scaling
    res = {"CPU": sc.cpus_per_worker} | ({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})
    run_config = RunConfig(
        name=ray_name,
        storage_path=storage.path,
        storage_filesystem=storage.filesystem,
        failure_config=FailureConfig(max_failures=sc.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": worker_env(cfg, loop_cfg["tracking_uri"])},
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=res
        ),
        run_config=run_config,
        datasets={"train": _stage_dataset(cfg, loop_cfg["stage"])},
    )


def _open_run(
    client: Any,
    cfg: JobConfig,
    storage: ck.Storage,
    stage: str,
    resume: str | None,
    parent: str | None,
) -> tuple[str, list[str]]:
    """(run id, where to look for the checkpoint to resume from): a new run (nothing), or the
    `--resume` run if compatible: its last launch's folder (a checkpoint written while the
    tracking server was away never got its tag) and the folder of the tagged checkpoint."""
    if resume is None:
        return tracking.start_stage_run(
            client, cfg, stage, f"{stage}-{uuid.uuid4().hex[:8]}", parent
        ), []
    run = tracking.find_run(client, cfg.mlflow.experiment, resume, stage)
    run_id = run.info.run_id
    run_stage_name = run.data.tags.get(tracking.STAGE_TAG)
    if run_stage_name != stage:
        raise ValueError(
            f"--resume {resume}: run {run_id} is stage {run_stage_name!r}, not {stage!r}"
        )
    if tracking.SINGLE_TAG_PREFIX + "trained_by" in run.data.tags:
        raise ValueError(
            f"--resume {resume}: run {run_id} was recorded by `pipeline.single log` and has no "
            "checkpoint to resume; start a new run (or --init from its bundle with pipeline.single)"
        )
    diff = resume_diff(tracking.load_run_config(client, run_id), cfg)
    if diff:
        raise ValueError(
            f"--resume {run_id}: config incompatible with the run's; differing keys: "
            + "; ".join(diff)
        )
    tracking.reopen_run(client, run_id)
    tags = run.data.tags
    tagged = tags.get(tracking.CKPT_TAG)
    launch = storage.uri(tags[tracking.RAY_NAME_TAG]) if tracking.RAY_NAME_TAG in tags else None
    if tagged and launch == tagged.rsplit("/", 1)[0]:
        launch = None  # the same folder: search it once
    return run_id, [where for where in (launch, tagged) if where]


def _resume_point(cfg: JobConfig, places: list[str]) -> str | None:
    """The newest complete checkpoint in the first of `places` that has one."""
    errors = []
    for where in places:
        try:
            return integrity.newest_complete(where, cfg.storage.endpoint, cfg.storage.region)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("; ".join(errors))
    return None


def run_stage(
    cfg: JobConfig, stage: str, resume: str | None = None, parent_run: str | None = None
) -> StageResult:
    """Driver: MLflow run (new or continued), dataset, TorchTrainer.fit, export publication."""
    get_stage(stage)  # fail before starting anything if the stage does not exist
    uri = tracking.tracking_uri(cfg)
    client = tracking.client_for(uri)
    storage = ck.resolve_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region)
    outbox.wait_reachable(uri, outbox.retry_budget(), "before starting the run")
    run_id, places = _open_run(client, cfg, storage, stage, resume, parent_run)
    with tracking.run_status(client, run_id):  # FINISHED, FAILED or KILLED in MLflow
        step = _fit(cfg, stage, client, uri, storage, run_id, places)
    tags = client.get_run(run_id).data.tags
    return StageResult(run_id, tags.get(tracking.CKPT_TAG), step, uri)


def _fit(
    cfg: JobConfig,
    stage: str,
    client: Any,
    uri: str,
    storage: ck.Storage,
    run_id: str,
    places: list[str],
) -> int:
    """One launch of the stage's TorchTrainer for `run_id`; returns the last published step."""
    # A fresh Ray run name per launch: Ray restores within one fit(); across launches the
    # folders MLflow names are the source of truth.
    resume_from = _resume_point(cfg, places)
    ray_name = f"{stage}-{uuid.uuid4().hex[:8]}"
    tracking.set_tags(client, run_id, {tracking.RAY_NAME_TAG: ray_name})
    ensure_ray(cfg)
    loop_cfg = {
        "config": cfg.to_dict(),
        "stage": stage,
        "run_id": run_id,
        "tracking_uri": uri,
        "resume_from": resume_from,
        "storage_uri": storage.uri(ray_name),
        "tracking_retry_s": outbox.retry_budget(),
    }
    with stage_driver(cfg, stage) as extra:
        loop_cfg["worker_extra"] = extra
        try:
            result = _trainer(cfg, loop_cfg, ray_name, storage).fit()
        except Exception as err:  # Ray's TrainingFailedError: a traceback's worth of text
            tags = client.get_run(run_id).data.tags if tracking.reachable(uri) else {}
            raise TrainingFailed(
                f"{stage} run {run_id} failed; last checkpoint step "
                f"{tags.get(tracking.CKPT_STEP_TAG, 'none')} ({tags.get(tracking.CKPT_TAG, '-')}),"
                f" resume with --resume {run_id}: {_reason(err)}"
            ) from err
    ckpt = result.checkpoint or (
        ck.open_uri(resume_from, cfg.storage.endpoint, cfg.storage.region) if resume_from else None
    )
    if ckpt is None:
        return 0
    ckpt_uri = storage.uri_prefix + ckpt.path if result.checkpoint else resume_from
    try:
        outbox.wait_reachable(uri, outbox.retry_budget(), f"while publishing run {run_id}")
    except outbox.TrackingUnreachable as err:
        raise TrainingFailed(
            f"{err}; training finished and its last checkpoint {ckpt_uri} holds the weights "
            f"and the metrics not logged yet: run the same command with --resume {run_id} "
            "once the server answers"
        ) from None
    return _publish(client, run_id, ckpt, ckpt_uri)


class TrainingFailed(RuntimeError):
    """A stage's Ray Train job failed (workers out of retries, storage unreachable, …)."""


def _reason(err: BaseException) -> str:
    """The last line of Ray's error that says what went wrong (one line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~"))]
    return (useful or lines or [type(err).__name__])[-1]


def _publish(client: Any, run_id: str, ckpt: Any, ckpt_uri: str) -> int:
    """Log the final checkpoint's consolidated Bundle as the run's `bundle` artifact (and tag
    the checkpoint: the worker's own tag may still sit in its outbox, or a checkpoint's)."""
    with ckpt.as_directory() as d:
        meta = ck.read_meta(Path(d))
        tracking.set_tags(
            client, run_id, {tracking.CKPT_TAG: ckpt_uri, tracking.CKPT_STEP_TAG: meta["step"]}
        )
        bundle = Path(d) / "bundle"
        if meta.get("export") and bundle.is_dir():
            client.log_artifacts(run_id, str(bundle), "bundle")
            tracking.set_tags(
                client, run_id, {tracking.EXPORT_TAG: "bundle", tracking.STATUS_TAG: "finished"}
            )
    return int(meta["step"])
