"""The trainer's worker set-up without Ray: CPU workers get as many intra-op threads as whole
logical CPUs (a fraction gets one), GPU workers keep torch's default."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.trainer import worker_env
from pipeline.worker_loop import cpu_threads


@pytest.mark.parametrize(("cpus", "threads"), [(0.5, 1), (1.0, 1), (2.7, 2), (8.0, 8)])
def test_cpu_workers_get_whole_cpus_as_threads(cpus: float, threads: int) -> None:
    cfg = load_config(None, [f"scaling.cpus_per_worker={cpus}"])
    assert cpu_threads(cfg) == threads
    env = worker_env(cfg, "sqlite:///x.db")
    assert env == {
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "MLFLOW_TRACKING_URI": "sqlite:///x.db",
    }


def test_gpu_workers_keep_default_threads() -> None:
    cfg = load_config(None, ["scaling.use_gpu=true", "scaling.cpus_per_worker=8"])
    assert cpu_threads(cfg) is None
    assert worker_env(cfg, "http://mlflow:5000") == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
