"""`omniforcing check`: passes on a good local config; fails fast and clearly on a bad key, a
missing bucket, a closed S3 port, a closed MLflow port, and resources the machine lacks. Uses the
real moto S3 endpoint (tests/fixtures/s3.py) and a real MLflow server (tests/fixtures/mlflow.py).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.check import Line, run_checks
from pipeline.eval_commands import register


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, **sections) -> str:
    """A tiny job config: local storage and sqlite MLflow in tmp_path unless overridden."""
    raw = {
        "model": {"preset": "tiny"},
        "data": {"source": "random"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "storage": {"path": str(tmp_path / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _by_name(lines: list[Line]) -> dict[str, Line]:
    return {line.name: line for line in lines}


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_good_local_config_passes(tmp_path, cli) -> None:
    res = CliRunner().invoke(cli, ["check", "--config", _config(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ("config", "storage", "data", "mlflow", "cpus", "gpus"):
        assert name in res.output
    assert "FAIL" not in res.output
    assert not list((tmp_path / "runs").iterdir())  # the probe object was deleted


def test_bad_key_names_its_path(tmp_path, cli) -> None:
    res = CliRunner().invoke(cli, ["check", "--config", _config(tmp_path, train={"lr": -1})])
    assert res.exit_code == 1
    assert "train.lr" in res.output and "FAIL" in res.output
    lines = run_checks(_config(tmp_path), ["scaling.num_wrkers=2"])
    assert len(lines) == 1 and not lines[0].ok and "scaling.num_wrkers" in lines[0].detail


def test_s3_storage_good_missing_bucket_and_closed_port(tmp_path, s3_bucket, s3_env) -> None:
    good = _by_name(run_checks(_config(tmp_path, storage={"path": s3_bucket + "/ckpt"})))
    assert good["storage"].ok, good["storage"].detail
    missing = _by_name(run_checks(_config(tmp_path, storage={"path": "s3://no-such-bucket-x1/p"})))
    assert not missing["storage"].ok and "NoSuchBucket" in missing["storage"].detail
    assert "storage.path" in missing["storage"].detail
    dead = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    closed = _by_name(
        run_checks(_config(tmp_path, storage={"path": s3_bucket, "endpoint": dead}), timeout=2)
    )
    assert time.monotonic() - t0 < 20  # no long retries
    assert not closed["storage"].ok and "unreachable" in closed["storage"].detail


def test_s3_data_shards_listed(tmp_path, s3_bucket, s3_env) -> None:
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=bucket, Key="shards/shard-000000.tar", Body=b"x")
    ok = _by_name(
        run_checks(_config(tmp_path, data={"source": "shards", "path": s3_bucket + "/shards"}))
    )
    assert ok["data"].ok and "1 shard" in ok["data"].detail
    empty = _by_name(
        run_checks(_config(tmp_path, data={"source": "shards", "path": s3_bucket + "/none"}))
    )
    assert not empty["data"].ok and "data.path" in empty["data"].detail


def test_mlflow_server_up_and_closed_port(tmp_path, cli, mlflow_server) -> None:
    up = _by_name(run_checks(_config(tmp_path, mlflow={"tracking_uri": mlflow_server})))
    assert up["mlflow"].ok and "healthy" in up["mlflow"].detail
    dead = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    res = CliRunner().invoke(
        cli, ["check", "--config", _config(tmp_path, mlflow={"tracking_uri": dead})]
    )
    assert time.monotonic() - t0 < 30
    assert res.exit_code == 1 and "unreachable" in res.output and dead in res.output


def test_resources_beyond_the_machine_fail(tmp_path) -> None:
    cfg = _config(tmp_path, scaling={"num_workers": 64, "use_gpu": True, "gpus_per_worker": 1})
    lines = _by_name(run_checks(cfg))
    assert not lines["cpus"].ok and "need 64 x 0.5 = 32" in lines["cpus"].detail
    assert not lines["gpus"].ok and "need 64" in lines["gpus"].detail


def test_teacher_actor_gpus_count_towards_the_gpus(tmp_path) -> None:
    from pipeline.check import check_resources
    from pipeline.config import load_config

    sets = ["distill.real_score=actors", "distill.actors=3", "distill.actor_gpus=0.5"]
    gpus = _by_name(check_resources(load_config(None, sets)))["gpus"]
    assert "need 1.5 " in gpus.detail and "distill.actor_gpus=0.5" in gpus.detail
    local = _by_name(check_resources(load_config(None, sets[1:])))["gpus"]  # no actor mode
    assert "need 0 " in local.detail


def test_codec_actors_count_towards_cpus_and_gpus() -> None:
    # The codec pool (data.codec_*) streams shards beside the trainers; random rows need none.
    from pipeline.check import check_resources
    from pipeline.config import load_config

    sets = ["data.codec_actors=4", "data.codec_cpus=1", "data.codec_gpus=0.25"]
    lines = _by_name(check_resources(load_config(None, sets)))
    assert "need 1 x 1 + 4 x 1 (data.codec_actors x codec_cpus) = 5," in lines["cpus"].detail
    assert "need 1 " in lines["gpus"].detail and "data.codec_gpus=0.25" in lines["gpus"].detail
    random = _by_name(check_resources(load_config(None, [*sets, "data.source=random"])))
    assert "need 0 " in random["gpus"].detail and "codec" not in random["cpus"].detail


@pytest.mark.parametrize("mode", ["distill.teacher_mode=actors", "distill.real_score=actors"])
def test_teacher_actor_cpus_count_towards_the_cpus(mode: str) -> None:
    # Either actor pool (ode scorer or self-forcing real score) takes actors x actor_cpus.
    from pipeline.check import check_resources
    from pipeline.config import load_config

    sets = ["distill.actors=3", "distill.actor_cpus=1.5", "scaling.cpus_per_worker=0.5"]
    cfg = load_config(None, [mode, *sets])
    assert cfg.distill.actor_resources() == (4.5, 0.0)
    cpus = _by_name(check_resources(cfg))["cpus"]
    assert "need 1 x 0.5 + 3 x 1.5 (distill.actors x actor_cpus) + 1 x 0.5 " in cpus.detail
    assert "= 5.5," in cpus.detail
    local = _by_name(check_resources(load_config(None, sets)))["cpus"]  # no actor mode
    assert "need 1 x 0.5 + 1 x 0.5 (data.codec_actors x codec_cpus) = 1," in local.detail


def test_local_ray_instance_reserves_what_the_check_counts(monkeypatch) -> None:
    # ensure_ray's local instance holds the trainers, 2 spare CPUs and the same actor CPUs as
    # the check (DistillSection.actor_resources); ray.init is captured, not called.
    import ray

    from pipeline.config import load_config
    from pipeline.trainer import ensure_ray

    seen: dict = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    sets = ["distill.actors=8", "distill.actor_cpus=1.5", "scaling.cpus_per_worker=0.5"]
    for mode, want in (("teacher_mode", 15), ("real_score", 15), (None, 4)):
        cfg = load_config(None, sets + ([f"distill.{mode}=actors"] if mode else []))
        ensure_ray(cfg)
        assert seen["num_cpus"] == want, (
            mode
        )  # 0.5 + 2 + 8 x 1.5 + 0.5 (codec actor) = 15; floor of 4
