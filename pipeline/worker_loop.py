"""The method-agnostic Ray Train worker loop (the worker side of `pipeline.trainer`).

`train_loop(loop_cfg)` runs on every worker: it rebuilds the config from `loop_cfg` only, lets the
stage build its DeepSpeed engines, restores a checkpoint (Ray's latest after a worker failure,
else `resume_from`), then steps the stage, logs metrics (rank 0, idempotent per step), checkpoints
(all ranks write, then `ray.train.report`) and exports a consolidated Bundle at the end. Ray
pickles `train_loop` by reference to this module, so it stays a module-level function. No driver
code (MLflow run, dataset, TorchTrainer: `pipeline.trainer`), no loss (stages), no model code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import checkpoint as ck
from pipeline import integrity, outbox, tracking
from pipeline.config import JobConfig, validate
from pipeline.fidelity import Watcher
from pipeline.fingerprint import fingerprint, resume_diff
from pipeline.parallelize import load_engine, save_engine, use_bf16
from pipeline.stages import Batch, WorkerContext, get_stage


def cpu_threads(cfg: JobConfig) -> int | None:
    """Intra-op threads of a CPU worker: its whole logical CPUs (a fraction gets 1); None on GPU
    workers (torch's default)."""
    sc = cfg.scaling
    return None if sc.use_gpu else max(1, int(sc.cpus_per_worker))


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
) -> tuple[int, dict[str, int], dict[str, Any]]:
    """(step, data position, unsent MLflow writes) from Ray's latest checkpoint or
    `resume_from`; (0, start, {}) if none."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    name = ckpt.path if ckpt is not None else loop_cfg.get("resume_from")
    if ckpt is None and name:
        ckpt = ck.open_uri(name, ctx.cfg.storage.endpoint, ctx.cfg.storage.region)
    if ckpt is None:
        return 0, {"epoch": 0, "index": 0}, {}
    with ckpt.as_directory() as d:
        d = Path(d)
        integrity.check_local(d, name)  # a torn or corrupted checkpoint is never loaded
        meta = ck.read_meta(d)
        if meta["fingerprint"] != fingerprint(ctx.cfg):
            diff = "; ".join(resume_diff(meta["config"], ctx.cfg))
            raise ValueError(f"checkpoint {d}: config differs from the run's: {diff}")
        for name, engine in stage.engines().items():
            load_engine(engine, d, name)
        for name, ema in stage.emas().items():
            ema.load(ck.load_tensors(d / "ema" / f"{name}-rank{ctx.rank}.safetensors"), str(d))
        ck.load_rng(d, ctx.rank)
        unsent = outbox.load_pending(d) if ctx.rank == 0 else {}
    return int(meta["step"]), dict(meta["data_position"]), unsent


def _save(
    stage: Any,
    ctx: WorkerContext,
    step: int,
    pos: dict[str, int],
    extra: dict[str, Any],
    box: outbox.TrackingOutbox | None = None,
) -> Path:
    """Every rank fills a private temp dir and lists what it wrote in its manifest (last),
    then renames it into place; rank 0 adds meta.json (with the world size) and the MLflow
    writes not sent yet (the tracking server may be away) before its own."""
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
        meta |= {"world": ctx.world, "config": ctx.cfg.to_dict()}
        ck.write_meta(tmp, {**meta, **extra})
    if box is not None:
        outbox.save_pending(box, tmp)
    integrity.write_manifest(tmp, ctx.rank)
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
    start, pos, unsent = _restore(stage, ctx, loop_cfg)
    stream = BatchStream(ray.train.get_dataset_shard("train"), cfg.data.batch_size, **pos)
    logger = None
    if ctx.rank == 0:  # MLflow's own retries would hold a send for minutes: the outbox retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        logger = outbox.TrackingOutbox(loop_cfg["tracking_uri"], loop_cfg["run_id"])
        logger.restore(unsent)
    t = cfg.train
    watch = Watcher(stage, ctx, logger)  # train.fidelity: evaluate, keep the best
    watch.start(start)  # a fresh start's weights compete as step 0
    for step in range(start + 1, t.steps + 1):
        t0 = time.perf_counter()
        metrics = _mean_across_ranks(stage.train_step(step, stream.next, ctx), ctx)
        per_step = cfg.data.batch_size * t.grad_accum * ctx.world
        metrics["samples_per_s"] = per_step / max(time.perf_counter() - t0, 1e-9)
        watch(step)  # collective at its steps; logs before the losses (see pipeline.fidelity)
        if logger and (step % t.log_every == 0 or step == t.steps):
            logger.log_metrics(step, metrics)
        if t.plot_every and step % t.plot_every == 0:
            _artifacts(stage, ctx, step, logger)
        if step % t.checkpoint_every == 0 or step == t.steps:
            _checkpoint(stage, ctx, step, stream.position(), metrics, loop_cfg, logger)
    if logger:
        _plot(logger, stage)
        _close(logger, loop_cfg)


def _close(box: outbox.TrackingOutbox, loop_cfg: dict[str, Any]) -> None:
    """Send the backlog before the worker ends; a server still away after the budget leaves
    it in the last checkpoint, to be logged by `--resume` (the driver then fails clearly)."""
    backlog = box.describe()
    left = box.close(float(loop_cfg.get("tracking_retry_s", outbox.DEFAULT_RETRY_S)))
    if left:
        logging.getLogger("omniforcing.tracking").warning(
            "MLflow server %s still unreachable: %s of run %s not logged; the metrics and tags "
            "are kept in the last checkpoint and are logged on --resume %s",
            box.uri,
            backlog,
            box.run_id,
            box.run_id,
        )


def _checkpoint(stage, ctx, step, pos, metrics, loop_cfg, logger) -> None:
    import ray.train
    from ray.train import Checkpoint

    final = step == ctx.cfg.train.steps
    name = f"step-{step:08d}"
    d = _save(stage, ctx, step, pos, {"stage": loop_cfg["stage"], "export": final}, logger)
    ray.train.report(
        {"step": step, **metrics},
        checkpoint=Checkpoint.from_directory(str(d)),
        checkpoint_dir_name=name,
    )
    shutil.rmtree(d.parent, ignore_errors=True)
    if logger:
        uri = loop_cfg["storage_uri"] + "/" + name
        logger.set_tags({tracking.CKPT_TAG: uri, tracking.CKPT_STEP_TAG: step})


def _artifacts(stage: Any, ctx: WorkerContext, step: int, logger: Any) -> None:
    """Loss curve (rank 0) and the stage's optional `artifacts(step, out_dir, ctx)` hook, e.g. a
    sample clip or contact sheet; the hook runs on every rank (sampling may be collective under
    ZeRO-3) and only rank 0 gets a folder, logged under `samples/step-<n>`."""
    hook = getattr(stage, "artifacts", None)
    with tempfile.TemporaryDirectory() as d:
        if hook is not None:
            hook(step, Path(d) if logger else None, ctx)
        if logger and any(Path(d).iterdir()):
            logger.log_artifacts(d, f"samples/step-{step:08d}")
    if logger:
        _plot(logger, stage)


def _plot(logger: outbox.TrackingOutbox, stage: Any) -> None:
    from pipeline.plots import loss_curve

    keys = getattr(stage, "plot_keys", ["loss"])
    with tempfile.TemporaryDirectory() as d:
        loss_curve(logger.history(keys), Path(d) / "loss_curve.png", title=stage.name)
        logger.log_artifacts(d, "plots")
