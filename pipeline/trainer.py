"""The method-agnostic Ray Train loop and its driver.

`train_loop(loop_cfg)` runs on every worker: it rebuilds the config from `loop_cfg` only, lets the
stage build its DeepSpeed engines, restores a checkpoint (Ray's latest after a worker failure,
else `resume_from`), then steps the stage, logs metrics (rank 0, idempotent per step), checkpoints
(all ranks write, then `ray.train.report`) and exports a consolidated Bundle at the end.
`run_stage(cfg, stage)` is the driver: MLflow run, dataset, the stage's driver-side resources
(`stage_driver`), `TorchTrainer`, and publishing the export. It holds no loss (stages do) and no
model code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import checkpoint as ck
from pipeline import tracking
from pipeline.config import JobConfig, fingerprint, resume_diff, validate
from pipeline.parallelize import load_engine, save_engine, use_bf16
from pipeline.stages import Batch, WorkerContext, get_stage


class BatchStream:
    """Numpy batches from this worker's shard, epoch after epoch, with a resumable position."""

    def __init__(self, shard: Any, batch_size: int, epoch: int = 0, index: int = 0) -> None:
        self.shard, self.batch_size = shard, batch_size
        self.epoch, self.index = epoch, index
        self._it: Iterator[Batch] | None = None

    def _open(self) -> Iterator[Batch]:
        it = iter(
            self.shard.iter_batches(
                batch_size=self.batch_size, batch_format="numpy", drop_last=True
            )
        )
        for _ in range(self.index):  # skip what the checkpoint already consumed this epoch
            next(it)
        return it

    def next(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._it = self._open()
            try:
                batch = next(self._it)
                self.index += 1
                return batch
            except StopIteration:
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
        raise RuntimeError("dataset shard yields no full batch (fewer clips than batch_size?)")

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _context(cfg: JobConfig, loop_cfg: dict[str, Any] | None = None) -> WorkerContext:
    """This worker's context; `extra` is what the stage's driver_resources yielded."""
    import ray.train

    tc = ray.train.get_context()
    gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{tc.get_local_rank()}" if gpu else "cpu")
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    extra = dict((loop_cfg or {}).get("worker_extra") or {})
    return WorkerContext(cfg, tc.get_world_rank(), tc.get_world_size(), device, dtype, extra)


def _restore(
    stage: Any, ctx: WorkerContext, loop_cfg: dict[str, Any]
) -> tuple[int, dict[str, int]]:
    """(step, data position) from Ray's latest checkpoint or `resume_from`; (0, start) if none."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_cfg.get("resume_from"):
        st = ctx.cfg.storage
        ckpt = ck.open_uri(loop_cfg["resume_from"], st.endpoint, st.region)
    if ckpt is None:
        return 0, {"epoch": 0, "index": 0}
    with ckpt.as_directory() as d:
        d = Path(d)
        meta = ck.read_meta(d)
        if meta["fingerprint"] != fingerprint(ctx.cfg):
            diff = "; ".join(resume_diff(meta["config"], ctx.cfg))
            raise ValueError(f"checkpoint {d}: config differs from the run's: {diff}")
        for name, engine in stage.engines().items():
            load_engine(engine, d, name)
        for name, ema in stage.emas().items():
            ema.load(ck.load_tensors(d / "ema" / f"{name}-rank{ctx.rank}.safetensors"), str(d))
        ck.load_rng(d, ctx.rank)
    return int(meta["step"]), dict(meta["data_position"])


def _save(
    stage: Any, ctx: WorkerContext, step: int, pos: dict[str, int], extra: dict[str, Any]
) -> Path:
    """Every rank fills a private temp dir, renames it into place; rank 0 adds meta.json last."""
    root = Path(tempfile.mkdtemp(prefix=f"omni-ckpt-r{ctx.rank}-"))
    tmp, final = ck.staging_dir(root, step)
    for name, engine in stage.engines().items():
        save_engine(engine, tmp, name)
    for name, ema in stage.emas().items():
        ck.save_tensors(tmp / "ema" / f"{name}-rank{ctx.rank}.safetensors", ema.state())
    ck.save_rng(tmp, ctx.rank)
    if extra.get("export"):
        stage.export(tmp / "bundle" if ctx.rank == 0 else None, ctx)
    if ctx.rank == 0:
        meta = {"step": step, "data_position": pos, "fingerprint": fingerprint(ctx.cfg)}
        ck.write_meta(tmp, {**meta, "config": ctx.cfg.to_dict(), **extra})
    return ck.commit(tmp, final)


def _mean_across_ranks(metrics: dict[str, float], ctx: WorkerContext) -> dict[str, float]:
    if ctx.world == 1 or not dist.is_initialized():
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world for k, v in zip(keys, t.tolist(), strict=True)}


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train worker entry point; reads nothing but `loop_cfg`."""
    import ray.train

    cfg = validate(loop_cfg["config"], source="train_loop_config")
    threads = cpu_threads(cfg)
    if threads is not None:  # OMP_NUM_THREADS may come after torch sized its pool
        torch.set_num_threads(threads)
    ctx = _context(cfg, loop_cfg)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    stage = get_stage(loop_cfg["stage"])()
    stage.setup(ctx)
    start, pos = _restore(stage, ctx, loop_cfg)
    stream = BatchStream(ray.train.get_dataset_shard("train"), cfg.data.batch_size, **pos)
    logger = (
        tracking.MetricLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"])
        if ctx.rank == 0
        else None
    )
    t = cfg.train
    for step in range(start + 1, t.steps + 1):
        t0 = time.perf_counter()
        metrics = _mean_across_ranks(stage.train_step(step, stream.next, ctx), ctx)
        per_step = cfg.data.batch_size * t.grad_accum * ctx.world
        metrics["samples_per_s"] = per_step / max(time.perf_counter() - t0, 1e-9)
        if logger and (step % t.log_every == 0 or step == t.steps):
            logger.log(step, metrics)
        if t.plot_every and step % t.plot_every == 0:
            _artifacts(stage, ctx, step, logger)
        if step % t.checkpoint_every == 0 or step == t.steps:
            _checkpoint(stage, ctx, step, stream.position(), metrics, loop_cfg, logger)
    if logger:
        _plot(logger, stage)


def _checkpoint(stage, ctx, step, pos, metrics, loop_cfg, logger) -> None:
    import ray.train
    from ray.train import Checkpoint

    final = step == ctx.cfg.train.steps
    name = f"step-{step:08d}"
    d = _save(stage, ctx, step, pos, {"stage": loop_cfg["stage"], "export": final})
    ray.train.report(
        {"step": step, **metrics},
        checkpoint=Checkpoint.from_directory(str(d)),
        checkpoint_dir_name=name,
    )
    shutil.rmtree(d.parent, ignore_errors=True)
    if logger:
        uri = loop_cfg["storage_uri"] + "/" + name
        tracking.set_tags(
            logger.client, logger.run_id, {tracking.CKPT_TAG: uri, tracking.CKPT_STEP_TAG: step}
        )


def _artifacts(stage: Any, ctx: WorkerContext, step: int, logger: Any) -> None:
    """Loss curve (rank 0) and the stage's optional `artifacts(step, out_dir, ctx)` hook, e.g. a
    sample clip or contact sheet; the hook runs on every rank (sampling may be collective under
    ZeRO-3) and only rank 0 gets a folder, logged under `samples/step-<n>`."""
    hook = getattr(stage, "artifacts", None)
    with tempfile.TemporaryDirectory() as d:
        if hook is not None:
            hook(step, Path(d) if logger else None, ctx)
        if logger and any(Path(d).iterdir()):
            logger.client.log_artifacts(logger.run_id, d, f"samples/step-{step:08d}")
    if logger:
        _plot(logger, stage)


def _plot(logger: tracking.MetricLogger, stage: Any) -> None:
    from pipeline.plots import loss_curve

    keys = getattr(stage, "plot_keys", ["loss"])
    with tempfile.TemporaryDirectory() as d:
        loss_curve(logger.history(keys), Path(d) / "loss_curve.png", title=stage.name)
        logger.log_artifact(Path(d) / "loss_curve.png", "plots")


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
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2
    d = cfg.distill
    if d.real_score == "actors":  # long-lived teacher actors (self-forcing real score)
        need += d.actors * d.actor_cpus
    ray.init(
        address="local",
        num_cpus=max(4, int(need + 0.999), os.cpu_count() or 1),
        include_dashboard=False,
    )


def _stage_dataset(cfg: JobConfig, stage: str) -> Any:
    """The job's dataset, passed through the stage's optional driver-side `prepare_dataset`
    hook (e.g. the `ode` stage's teacher-scoring actor pool)."""
    ds = build_dataset(cfg)
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


def build_dataset(cfg: JobConfig) -> Any:
    """Rows {key, caption, video [Fv,h,w,C], audio [Fa,C]}: shards (the real path) or random."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same seed, same batches (determinism)
    ctx.enable_progress_bars = False
    if cfg.data.source == "shards":
        from data.ray_data import latent_dataset

        # S3 endpoint and keys come from the environment (AWS_ENDPOINT_URL, AWS_*), see data/.
        ds = latent_dataset(
            cfg.data.path, cfg.data.codec_dir or cfg.data.path.rstrip("/") + "/codecs"
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


def cpu_threads(cfg: JobConfig) -> int | None:
    """Intra-op threads of a CPU worker: its whole logical CPUs (a fraction gets 1); None on GPU
    workers (torch's default)."""
    sc = cfg.scaling
    return None if sc.use_gpu else max(1, int(sc.cpus_per_worker))


def worker_env(cfg: JobConfig, tracking_uri: str) -> dict[str, str]:
    """Environment of every Ray Train worker process."""
    cpu = not cfg.scaling.use_gpu
    env = {"OMP_NUM_THREADS": str(cpu_threads(cfg)), "DS_ACCELERATOR": "cpu"} if cpu else {}
    # Workers resolve models:/ and runs:/ references (teacher, ODE student) against the job's
    # tracking server, not whatever default the worker process would pick.
    return env | {"MLFLOW_TRACKING_URI": tracking_uri}


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
    client: Any, cfg: JobConfig, stage: str, resume: str | None, parent: str | None
) -> tuple[str, str | None]:
    """(run id, checkpoint to resume from): a new run, or the `--resume` run if compatible."""
    if resume is None:
        return tracking.start_stage_run(
            client, cfg, stage, f"{stage}-{uuid.uuid4().hex[:8]}", parent
        ), None
    run = tracking.find_run(client, cfg.mlflow.experiment, resume, stage)
    run_id = run.info.run_id
    run_stage_name = run.data.tags.get(tracking.STAGE_TAG)
    if run_stage_name != stage:
        raise ValueError(
            f"--resume {resume}: run {run_id} is stage {run_stage_name!r}, not {stage!r}"
        )
    diff = resume_diff(tracking.load_run_config(client, run_id), cfg)
    if diff:
        raise ValueError(
            f"--resume {run_id}: config incompatible with the run's; differing keys: "
            + "; ".join(diff)
        )
    tracking.set_tags(client, run_id, {tracking.STATUS_TAG: "running"})
    return run_id, run.data.tags.get(tracking.CKPT_TAG)


def run_stage(
    cfg: JobConfig, stage: str, resume: str | None = None, parent_run: str | None = None
) -> StageResult:
    """Driver: MLflow run (new or continued), dataset, TorchTrainer.fit, export publication."""
    get_stage(stage)  # fail before starting anything if the stage does not exist
    uri = tracking.tracking_uri(cfg)
    client = tracking.client_for(uri)
    storage = ck.resolve_storage(cfg.storage.path, cfg.storage.endpoint, cfg.storage.region)
    run_id, resume_from = _open_run(client, cfg, stage, resume, parent_run)
    # A fresh Ray run name per launch: Ray restores within one fit(); across launches the
    # MLflow-tracked checkpoint URI is the source of truth.
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
    }
    with stage_driver(cfg, stage) as extra:
        loop_cfg["worker_extra"] = extra
        result = _trainer(cfg, loop_cfg, ray_name, storage).fit()
    ckpt = result.checkpoint or (
        ck.open_uri(resume_from, cfg.storage.endpoint, cfg.storage.region) if resume_from else None
    )
    step = _publish(client, run_id, ckpt) if ckpt else 0
    tags = client.get_run(run_id).data.tags
    return StageResult(run_id, tags.get(tracking.CKPT_TAG), step, uri)


def _publish(client: Any, run_id: str, ckpt: Any) -> int:
    """Log the final checkpoint's consolidated Bundle as the run's `bundle` artifact."""
    with ckpt.as_directory() as d:
        meta = ck.read_meta(Path(d))
        bundle = Path(d) / "bundle"
        if meta.get("export") and bundle.is_dir():
            client.log_artifacts(run_id, str(bundle), "bundle")
            tracking.set_tags(
                client, run_id, {tracking.EXPORT_TAG: "bundle", tracking.STATUS_TAG: "finished"}
            )
    return int(meta["step"])
