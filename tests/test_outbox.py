"""TrackingOutbox on its own, against a real MLflow server behind a TCP proxy: order kept, each
step once, a write the server refuses does not hold the rest back, and what was unsent when the
server went away survives a checkpoint round trip into a new process's outbox."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import outbox
from tests.fixtures.outage import TcpProxy


@pytest.fixture
def proxy(mlflow_server: str):
    p = TcpProxy(mlflow_server)
    p.up()
    try:
        yield p
    finally:
        p.down()


def _run(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name) or client.get_experiment(
        client.create_experiment(name)
    )
    return client.create_run(exp.experiment_id).info.run_id


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_outbox_sends_in_order_and_skips_a_refused_write(
    mlflow_server: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    direct = MlflowClient(mlflow_server)
    run_id = _run(direct, "outbox-unit")
    box = outbox.TrackingOutbox(proxy.url, run_id)
    box.log_metrics(0, {"fidelity/sync_40ms": 0.5})  # a start's evaluation, before any loss
    box.log_metrics(1, {"loss": 3.0})
    box.set_tags({"a": 1})
    with caplog.at_level(logging.ERROR, logger="omniforcing.tracking"):
        box.log_metrics(2, {"loss": 2.0, "bad key!": 1.0})  # MLflow refuses the name
        box.log_metrics(3, {"loss": 1.0})
        assert box.close(60) == 0  # the refused write was dropped, not retried forever
    assert "MLflow refused ('metrics', 2)" in caplog.text
    assert _steps(direct, run_id) == [1, 3]
    assert _steps(direct, run_id, "fidelity/sync_40ms") == [0]  # step 0 is a step too
    assert direct.get_run(run_id).data.tags["a"] == "1"
    assert box.history(["loss"])["loss"] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_unsent_writes_ride_a_checkpoint_into_the_next_process(
    mlflow_server: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    direct = MlflowClient(mlflow_server)
    run_id = _run(direct, "outbox-unit")
    first = outbox.TrackingOutbox(proxy.url, run_id)
    first.log_metrics(1, {"loss": 3.0})
    assert first.close(60) == 0
    proxy.down()
    first = outbox.TrackingOutbox(proxy.url, run_id)
    for step in (2, 3):
        first.log_metrics(step, {"loss": 4.0 - step})
    first.set_tags({"omniforcing.checkpoint": "s3://b/step-3"})
    assert first.close(0.5) == 3  # the server is away: all of it still queued
    assert "2 metric steps (2-3), 1 tag sets" in first.describe()
    outbox.save_pending(first, tmp_path)  # what a checkpoint carries
    saved = outbox.load_pending(tmp_path)

    proxy.up()
    second = outbox.TrackingOutbox(proxy.url, run_id)
    assert second.restore(saved) == 3
    second.log_metrics(1, {"loss": 9.0})  # a step the run already has: dropped
    second.log_metrics(4, {"loss": 0.5})
    assert second.close(60) == 0
    assert _steps(direct, run_id) == [1, 2, 3, 4]
    assert [m.value for m in direct.get_metric_history(run_id, "loss") if m.step == 1] == [3.0]
    assert direct.get_run(run_id).data.tags["omniforcing.checkpoint"] == "s3://b/step-3"
    other = outbox.TrackingOutbox(proxy.url, "another-run")
    assert other.restore(saved) == 0  # a checkpoint's backlog belongs to its own run only
    other.close(0)
