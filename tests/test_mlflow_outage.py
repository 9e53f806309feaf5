"""The MLflow tracking server goes away mid-run (its port closed behind a TCP proxy, then open
again, tests/fixtures/outage.py): training goes on, the worker buffers its metrics and tags and
sends them when the server answers, each step exactly once; a server that stays away past the
retry budget fails the stage with one line naming the server and the `--resume` that logs what
was buffered (the unsent metrics ride in the checkpoint). Real local Ray, real DeepSpeed, a real
MLflow server (sqlite store, artifacts on moto S3)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.trainer import TrainingFailed, run_stage
from tests.fixtures.outage import TcpProxy

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 12


@pytest.fixture
def mlflow_proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch):
    proxy = TcpProxy(mlflow_server)
    proxy.up()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    try:
        yield proxy
    finally:
        proxy.down()


def _cfg(tmp_path: Path, experiment: str):
    return load_config(
        CONFIG,
        [
            "scaling.num_workers=1",
            "scaling.max_failures=0",  # the outbox alone must ride the outage out
            f"train.steps={STEPS}",
            "train.checkpoint_every=4",
            "train.reliance_every=0",
            "train.log_every=1",
            f"storage.path={tmp_path / 'runs'}",
            f"mlflow.experiment={experiment}",
        ],
    )


def _outage(direct: MlflowClient, experiment: str, proxy: TcpProxy, runs: Path, until_step: int):
    """Close the server's port once step 1 is logged; reopen it once checkpoint `until_step`
    is on disk (steps 2..until_step ran meanwhile) and 5 s more; until_step 0: never reopen."""
    times: dict[str, float] = {}

    def body() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            exp = direct.get_experiment_by_name(experiment)
            runs_ = direct.search_runs([exp.experiment_id]) if exp else []
            if runs_ and direct.get_metric_history(runs_[0].info.run_id, "loss"):
                break
            time.sleep(0.1)
        proxy.down()
        times["down"] = time.time()
        if not until_step:
            return
        while not list(runs.glob(f"*/step-{until_step:08d}/meta.json")):
            time.sleep(0.2)
        time.sleep(5)
        times["up"] = time.time()
        proxy.up()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, times


def _history(direct: MlflowClient, run_id: str) -> list:
    return sorted(direct.get_metric_history(run_id, "loss"), key=lambda m: m.step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_mlflow_outage_is_buffered(
    ray_local, mlflow_server: str, mlflow_proxy: TcpProxy, tmp_path: Path
) -> None:
    direct = MlflowClient(mlflow_server)  # the test's own view, not through the proxy
    thread, times = _outage(direct, "mlflow-outage", mlflow_proxy, tmp_path / "runs", 8)
    result = run_stage(_cfg(tmp_path, "mlflow-outage"), "teacher")
    thread.join(timeout=60)
    print(f"server away for {times['up'] - times['down']:.1f} s")
    hist = _history(direct, result.run_id)
    assert [m.step for m in hist] == list(range(1, STEPS + 1))  # each step once
    during = [m.step for m in hist if times["down"] * 1000 < m.timestamp < times["up"] * 1000]
    assert 8 in during, f"steps logged while the server was away: {during}"
    run = direct.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.CKPT_TAG].endswith(f"step-{STEPS:08d}")
    assert run.data.tags[tracking.EXPORT_TAG] == "bundle"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_away_past_the_budget_fails_clearly_and_resume_logs_the_rest(
    ray_local,
    mlflow_server: str,
    mlflow_proxy: TcpProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMNIFORCING_MLFLOW_RETRY_S", "5")
    direct = MlflowClient(mlflow_server)
    cfg = _cfg(tmp_path, "mlflow-outage-long")
    thread, times = _outage(direct, "mlflow-outage-long", mlflow_proxy, tmp_path / "runs", 0)
    t0 = time.monotonic()
    with pytest.raises(TrainingFailed) as failed:
        run_stage(cfg, "teacher")
    print(f"failed {time.monotonic() - t0:.1f} s after the start: {failed.value}")
    run_id = direct.search_runs(
        [direct.get_experiment_by_name("mlflow-outage-long").experiment_id]
    )[0].info.run_id
    msg = str(failed.value)
    assert "\n" not in msg
    assert f"MLflow server {mlflow_proxy.url} unreachable" in msg
    assert f"--resume {run_id}" in msg and f"step-{STEPS:08d}" in msg
    assert direct.get_run(run_id).info.status == "RUNNING"  # nobody could tell the server
    assert len(_history(direct, run_id)) < STEPS

    mlflow_proxy.up()
    resumed = run_stage(cfg, "teacher", resume=run_id)
    assert resumed.run_id == run_id and resumed.step == STEPS
    assert [m.step for m in _history(direct, run_id)] == list(range(1, STEPS + 1))
    run = direct.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.EXPORT_TAG] == "bundle"
    assert run.data.tags[tracking.CKPT_TAG].endswith(f"step-{STEPS:08d}")
