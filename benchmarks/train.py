"""Training-platform benchmark on the tiny preset (CPU, local Ray, real DeepSpeed over gloo).

Prints two ratios measured in one run:
  1. throughput: samples/s with 2 workers vs 1 worker (ZeRO-2), median over the timed steps of
     the real `pipeline.trainer.run_stage` path (metrics read back from MLflow);
  2. memory per rank: ZeRO-3 vs ZeRO-2 bytes of this rank's parameter pieces + optimizer state
     (exp_avg, exp_avg_sq and fp32 master partitions), 2 workers, plus peak RSS per rank.
It does not tune anything; on a shared 2-core box throughput ratios are noisy (run it idle).
`run(...)` returns the figures (used by `omniforcing bench`); `main()` prints them.

    python benchmarks/train.py [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if TYPE_CHECKING:
    from pipeline.config import JobConfig

# configs/tiny.yaml as a dict: configs/ is not part of the installed package, and
# `omniforcing bench` must run from a plain `pip install .`. tests/test_bench.py asserts that it
# equals the YAML, so the two cannot drift.
TINY: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "data": {"source": "random", "batch_size": 2, "seconds": 1, "random_clips": 16},
    "train": {
        "steps": 6,
        "lr": 3.0e-3,
        "warmup_steps": 1,
        "schedule": "cosine",
        "grad_accum": 1,
        "clip_grad": 1.0,
        "text_dropout": 0.1,
        "seed": 0,
        "zero_stage": 2,
        "precision": "fp32",
        "checkpoint_every": 3,
        "keep_checkpoints": 2,
        "reliance_every": 3,
        "plot_every": 0,
    },
    "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 1},
    "storage": {"path": "runs/tiny"},
    "mlflow": {"experiment": "omniforcing-tiny"},
}


def tiny_config(overrides: list[str]) -> JobConfig:
    """The tiny job config (TINY) with `--set`-style overrides applied, validated."""
    from pipeline.config import apply_override, parse_override, validate

    raw = copy.deepcopy(TINY)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return validate(raw, source="benchmarks.train.TINY")


def _tensor_bytes(obj: Any) -> int:
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def memory_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train worker: build the teacher engine, take 2 steps, report per-rank bytes."""
    import resource

    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.config import validate
    from pipeline.parallelize import _local
    from pipeline.stages.teacher import TeacherStage
    from pipeline.worker_loop import BatchStream, _context

    cfg = validate(loop_cfg["config"])
    ctx = _context(cfg)
    torch.manual_seed(0)
    stage = TeacherStage()
    stage.setup(ctx)
    stream = BatchStream(ray.train.get_dataset_shard("train"), cfg.data.batch_size)
    for step in (1, 2):
        stage.train_step(step, stream.next, ctx)
    engine = stage.engine
    params = sum(_local(p).numel() * _local(p).element_size() for p in engine.module.parameters())
    inner = (
        engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    )
    opt = _tensor_bytes(list(inner.state.values()))
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        opt += _tensor_bytes(getattr(engine.optimizer, name, []))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = torch.tensor([params, opt, rss], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(every, mine)
    if ctx.rank == 0:  # Ray Train V2 keeps metrics only with checkpoints: hand back via a file
        with open(loop_cfg["out"], "w") as f:
            json.dump([t.tolist() for t in every], f)
    ray.train.report({})


def measure_memory(cfg: Any) -> list[list[float]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.trainer import build_dataset

    out = os.path.join(tempfile.mkdtemp(prefix="omni-bench-mem-"), "per_rank.json")
    trainer = TorchTrainer(
        memory_loop,
        train_loop_config={"config": cfg.to_dict(), "out": out},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            storage_path=tempfile.mkdtemp(prefix="omni-bench-"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
        ),
        datasets={"train": build_dataset(cfg)},
    )
    trainer.fit()
    with open(out) as f:
        return json.load(f)


def measure_throughput(cfg: Any) -> float:
    from mlflow.tracking import MlflowClient

    from pipeline.trainer import run_stage

    res = run_stage(cfg, "teacher")
    hist = sorted(
        MlflowClient(res.tracking_uri).get_metric_history(res.run_id, "samples_per_s"),
        key=lambda m: m.step,
    )
    timed = [m.value for m in hist[2:]] or [m.value for m in hist]  # skip warm-up steps
    return statistics.median(timed)


def run(steps: int = 12) -> dict:
    """samples/s with 1 and 2 workers, and ZeRO-3 vs ZeRO-2 bytes per rank, on a private local Ray."""
    import ray

    root = tempfile.mkdtemp(prefix="omni-bench-")
    common = [
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.reliance_every=0",
        "train.plot_every=0",
        f"storage.path={root}",
        "mlflow.experiment=bench",
        "data.random_clips=64",
    ]
    # address="local": always a new cluster, never one already running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        sps, mem = {}, {}
        for workers in (1, 2):
            cfg = tiny_config([*common, f"scaling.num_workers={workers}"])
            sps[workers] = measure_throughput(cfg)
        for stage in (2, 3):
            cfg = tiny_config([*common, f"train.zero_stage={stage}"])
            mem[stage] = measure_memory(cfg)
    finally:
        ray.shutdown()
    per_rank = {s: sum(p + o for p, o, _ in mem[s]) / len(mem[s]) for s in (2, 3)}
    return {
        "steps": steps,
        "samples_per_s": {"1": sps[1], "2": sps[2]},
        "ratio_2_over_1": sps[2] / sps[1],
        "zero_ranks": {str(s): mem[s] for s in (2, 3)},  # [params B, optimizer B, peak RSS B]
        "zero_bytes_per_rank": {str(s): per_rank[s] for s in (2, 3)},
        "zero3_over_zero2": per_rank[3] / per_rank[2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    out = run(args.steps)
    sps = out["samples_per_s"]
    print(
        f"samples/s  1 worker: {sps['1']:.1f}   2 workers: {sps['2']:.1f}   ratio 2/1: {out['ratio_2_over_1']:.2f}"
    )
    for stage, ranks in out["zero_ranks"].items():
        for rank, (p, o, rss) in enumerate(ranks):
            print(
                f"ZeRO-{stage} rank {rank}: params {p / 1e3:.1f} kB, optimizer {o / 1e3:.1f} kB, peak RSS {rss / 1e6:.0f} MB"
            )
    print(f"param+optimizer bytes per rank  ZeRO-3/ZeRO-2: {out['zero3_over_zero2']:.2f}")


if __name__ == "__main__":
    main()
