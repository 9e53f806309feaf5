"""Registry: promote a finished student run to `models:/name@alias` on a real MLflow server
(sqlite + S3 artifacts), load it back as a Bundle, and refuse runs that are not promotable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.registry import PromotionError, load_bundle, promote


def _student_run(client: MlflowClient, bundle_dir: Path | None, stage: str, status: str) -> str:
    cfg = load_config("configs/tiny.yaml", ["mlflow.experiment=registry-test"])
    rid = tracking.start_stage_run(client, cfg, stage, f"{stage}-test")
    if bundle_dir is not None:
        client.log_artifacts(rid, str(bundle_dir), "bundle")
        tracking.set_tags(client, rid, {tracking.EXPORT_TAG: "bundle"})
    tracking.set_tags(client, rid, {tracking.STATUS_TAG: status})
    return rid


@pytest.mark.slow
def test_promote_then_load_by_alias(mlflow_uri: str, tiny_bundle_dir: Path) -> None:
    client = MlflowClient(mlflow_uri)
    rid = _student_run(client, tiny_bundle_dir, "self-forcing", "finished")
    out = promote(rid, name="omni-test", alias="champion", tracking_uri=mlflow_uri)
    assert out["version"] == "1" and out["run_id"] == rid
    assert client.get_model_version_by_alias("omni-test", "champion").version == "1"
    # A second promotion moves the alias to version 2.
    rid2 = _student_run(client, tiny_bundle_dir, "self-forcing", "finished")
    assert (
        promote(
            "latest",
            name="omni-test",
            alias="champion",
            tracking_uri=mlflow_uri,
            experiment="registry-test",
        )["run_id"]
        == rid2
    )
    assert client.get_model_version_by_alias("omni-test", "champion").version == "2"

    bundle = load_bundle("models:/omni-test@champion")
    ref = load_bundle(str(tiny_bundle_dir))
    for (k, a), (_, b) in zip(
        bundle.model.state_dict().items(), ref.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert bundle.config.causal


@pytest.mark.slow
def test_promote_refuses_unfinished_or_teacher(mlflow_uri: str, tiny_bundle_dir: Path) -> None:
    client = MlflowClient(mlflow_uri)
    running = _student_run(client, None, "self-forcing", "running")
    with pytest.raises(PromotionError, match="no finished student checkpoint"):
        promote(running, name="omni-refuse", tracking_uri=mlflow_uri)
    teacher = _student_run(client, tiny_bundle_dir, "teacher", "finished")
    with pytest.raises(PromotionError, match="only a student stage"):
        promote(teacher, name="omni-refuse", tracking_uri=mlflow_uri)
    with pytest.raises(PromotionError, match="does not exist"):
        promote("0" * 32, name="omni-refuse", tracking_uri=mlflow_uri)


def test_load_bundle_errors_name_the_uri(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_bundle(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Bundle"):
        load_bundle(str(tmp_path / "empty"))


def test_runs_and_promote_cli(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    sets = ["--set", f"storage.path={tmp_path}", "--set", "mlflow.experiment=cli"]
    cfg = load_config("configs/tiny.yaml", [s for s in sets if s != "--set"])
    client = MlflowClient(tracking.tracking_uri(cfg))
    rid = tracking.start_stage_run(client, cfg, "ode", "ode-cli")
    tracking.set_tags(client, rid, {tracking.CKPT_STEP_TAG: "7", tracking.CKPT_TAG: "/ckpt/step-7"})
    runner = CliRunner()
    res = runner.invoke(app, ["runs", "-c", "configs/tiny.yaml", *sets], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if rid in line)
    assert "ode" in row and "RUNNING" in row and "running" in row and "7" in row
    client.set_terminated(rid, "KILLED")  # MLflow's own status is its own column
    res = runner.invoke(app, ["runs", "-c", "configs/tiny.yaml", *sets], env={"COLUMNS": "250"})
    row = next(line for line in res.output.splitlines() if rid in line)
    assert "KILLED" in row and "RUNNING" not in row
    res = runner.invoke(app, ["promote", "--run", rid, "-c", "configs/tiny.yaml", *sets])
    assert res.exit_code == 2 and "no finished student checkpoint" in res.output
    assert "Traceback" not in res.output
