"""MLflow's own run status: every stage run and pipeline parent ends FINISHED, FAILED (raised),
or KILLED (KeyboardInterrupt, SIGTERM); a resumed run is RUNNING again until it ends. Against a
real MLflow server (sqlite + S3 artifacts on moto). The training itself is replaced by a stub
here (the real trainer's statuses are checked in tests/test_resume.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, experiment: str):
    return load_config(CONFIG, [f"storage.path={tmp_path}", f"mlflow.experiment={experiment}"])


def _status(uri: str, run_id: str) -> tuple[str, str | None]:
    run = MlflowClient(uri).get_run(run_id)
    return run.info.status, run.data.tags.get(tracking.STATUS_TAG)


def test_stage_run_ends_finished_failed_killed_and_resume_reopens(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.trainer as trainer

    cfg = _cfg(tmp_path, "status")
    seen: list[str] = []

    def fit(cfg, stage, client, uri, storage, run_id, resume_from):  # noqa: ANN001
        seen.append(client.get_run(run_id).info.status)
        if outcome == "raise":
            raise RuntimeError("worker exploded")
        if outcome == "interrupt":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(trainer, "_fit", fit)
    outcome = "ok"
    ok = trainer.run_stage(cfg, "teacher")
    assert _status(mlflow_uri, ok.run_id)[0] == "FINISHED"
    outcome = "raise"
    with pytest.raises(RuntimeError):
        trainer.run_stage(cfg, "teacher")
    failed = tracking.find_run(MlflowClient(mlflow_uri), "status", "latest", "teacher")
    assert _status(mlflow_uri, failed.info.run_id) == ("FAILED", "failed")
    outcome = "interrupt"
    with pytest.raises(KeyboardInterrupt):
        trainer.run_stage(cfg, "teacher", resume=failed.info.run_id)
    assert _status(mlflow_uri, failed.info.run_id) == ("KILLED", "killed")
    outcome = "ok"  # `--resume latest` finds the run on the server: the killed one
    again = trainer.run_stage(cfg, "teacher", resume="latest")
    assert again.run_id == failed.info.run_id
    assert _status(mlflow_uri, again.run_id)[0] == "FINISHED"
    assert seen == ["RUNNING"] * 4  # a resumed run is reopened before training starts


def test_sigterm_marks_the_cli_run_killed(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.trainer as trainer
    from pipeline.cli import app

    def fit(*_args, **_kw) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # what `ray job stop` / a pod deletion sends
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(trainer, "_fit", fit)
    args = ["train", "teacher", "-c", str(CONFIG), "--set", f"storage.path={tmp_path}"]
    res = CliRunner().invoke(app, [*args, "--set", "mlflow.experiment=sigterm"])
    assert res.exit_code == 130, res.output  # click's exit code for an interrupt
    run = tracking.find_run(MlflowClient(mlflow_uri), "sigterm", "latest", "teacher")
    assert _status(mlflow_uri, run.info.run_id) == ("KILLED", "killed")
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back


def test_failed_training_is_one_cli_line(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.trainer as trainer
    from pipeline.cli import app

    def fit(*_args, **_kw) -> int:
        raise trainer.TrainingFailed("teacher run x failed; last checkpoint step 2 (…): why")

    monkeypatch.setattr(trainer, "_fit", fit)
    args = ["train", "teacher", "-c", str(CONFIG), "--set", f"storage.path={tmp_path}"]
    res = CliRunner().invoke(app, [*args, "--set", "mlflow.experiment=fails"])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert errors == ["error: teacher run x failed; last checkpoint step 2 (…): why"]
    run = tracking.find_run(MlflowClient(mlflow_uri), "fails", "latest", "teacher")
    assert _status(mlflow_uri, run.info.run_id) == ("FAILED", "failed")


def test_pipeline_parent_run_ends_finished_or_failed(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.commands as commands
    from pipeline.cli import app

    args = ["pipeline", "-c", str(CONFIG), "--set", f"storage.path={tmp_path}"]
    client = MlflowClient(mlflow_uri)
    for experiment, stages, want in (("pipe-ok", None, "FINISHED"), ("pipe-bad", 1, "FAILED")):

        def stages_stub(*_args, fail=stages) -> None:
            if fail:
                raise RuntimeError("stage failed")

        monkeypatch.setattr(commands, "_stages", stages_stub)
        CliRunner().invoke(app, [*args, "--set", f"mlflow.experiment={experiment}"])
        parent = tracking.find_run(client, experiment, "latest", "pipeline")
        assert parent.info.status == want, experiment
