"""The trainer's worker set-up without Ray: CPU workers get as many intra-op threads as whole
logical CPUs (a fraction gets one), GPU workers keep torch's default."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.trainer import worker_env
from pipeline.worker_loop import cpu_threads


@pytest.mark.parametrize(("cpus", "threads"), [(0.5, 1), (1.0, 1), (2.7, 2), (8.0, 8)])
def test_cpu_workers_get_whole_cpus_as_threads(cpus: float, threads: int, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    cfg = load_config(None, [f"scaling.cpus_per_worker={cpus}"])
    assert cpu_threads(cfg) == threads
    env = worker_env(cfg, "sqlite:///x.db")
    assert env == {
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "MLFLOW_TRACKING_URI": "sqlite:///x.db",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def test_gpu_workers_keep_default_threads(monkeypatch) -> None:
    cfg = load_config(None, ["scaling.use_gpu=true", "scaling.cpus_per_worker=8"])
    assert cpu_threads(cfg) is None
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # the driver's choice wins
    assert worker_env(cfg, "http://mlflow:5000") == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true",
    }


def test_ema_warms_up_then_holds_its_decay() -> None:
    """EMA decay min(d, (1+s)/(10+s)): a 40-step stage's export follows its training (a flat 0.999
    kept 96 % of the initial weights), a long run settles at the configured decay."""
    import torch

    from pipeline.parallelize import Ema

    net = torch.nn.Linear(3, 3)
    ema = Ema(net, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(39) == pytest.approx(40 / 49)
    assert ema.decay_at(20_000) == 0.999 and ema.decay_at(None) == 0.999
    with torch.no_grad():
        net.weight.add_(1.0)  # the "trained" weights, one away from the initial ones
    for step in range(40):
        ema.update(net, step)
    moved = (ema.state()["weight"] - (net.weight - 1.0)).mean().item()
    assert moved > 0.99  # nearly all the way to the trained weights
    flat_net = torch.nn.Linear(3, 3)
    flat = Ema(flat_net, 0.999)
    with torch.no_grad():
        flat_net.weight.add_(1.0)
    for _ in range(40):
        flat.update(flat_net)  # no step: the configured decay throughout, as before
    assert (flat.state()["weight"] - (flat_net.weight - 1.0)).mean().item() < 0.05
