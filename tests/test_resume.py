"""Resume: a killed worker is replaced and the job finishes with contiguous metric steps; a new
cluster (fresh Ray, no local files) resumes from MLflow + S3 alone, from the newest complete
checkpoint, and equals an uninterrupted run (bit-exact weights on CPU); an incompatible config
is refused naming the differing keys. Real local Ray, real DeepSpeed, sqlite MLflow or the
MLflow server, moto S3."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.config import load_config
from pipeline.trainer import run_stage

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _train_workers() -> list[psutil.Process]:
    """RayTrainWorker processes of *this* test's Ray (descendants of this process)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
def test_killed_worker_is_replaced_and_run_finishes(ray_local, tmp_path: Path) -> None:
    cfg = load_config(
        CONFIG,
        [
            "train.steps=24",
            "train.checkpoint_every=4",
            "train.reliance_every=0",
            "scaling.max_failures=1",
            f"storage.path={tmp_path}",
            "mlflow.experiment=kill",
        ],
    )
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(r=run_stage(cfg, "teacher")), daemon=True
    )
    thread.start()
    client = MlflowClient(tracking.tracking_uri(cfg))
    killed = None
    deadline = time.monotonic() + 400
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.5)
        exp = client.get_experiment_by_name("kill")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and int(runs[0].data.tags.get(tracking.CKPT_STEP_TAG, 0)) >= 4:
            workers = _train_workers()
            if len(workers) == 2:
                killed = workers[1].pid
                os.kill(killed, signal.SIGKILL)  # a real worker process dies mid-run
    assert killed is not None, "run finished (or stalled) before a worker could be killed"
    thread.join(500)
    assert "r" in result, "run did not finish after the worker was killed"
    res = result["r"]
    assert (
        res.step == 24
        and not psutil.pid_exists(killed)
        or psutil.Process(killed).status() == "zombie"
    )
    assert _steps(res.tracking_uri, res.run_id) == list(range(1, 25))  # contiguous, no duplicates
    assert client.get_run(res.run_id).data.tags[tracking.STATUS_TAG] == "finished"


def _bundle_weights(ckpt_uri: str) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import open_uri

    with open_uri(ckpt_uri).as_directory() as d:
        return load_file(str(Path(d) / "bundle" / "model.safetensors"))


def _losses(uri: str, run_id: str) -> list[tuple[int, float]]:
    hist = MlflowClient(uri).get_metric_history(run_id, "loss")
    return sorted((m.step, m.value) for m in hist)


@contextlib.contextmanager
def _own_ray_and_temp() -> Iterator[Path]:
    """A Ray instance of the test's own whose every local file (session folder, logs, spilled
    objects, the job's temp dirs: TMPDIR in the driver and, inherited, in every worker) lives in
    one folder the test can delete; the tests' shared instance is brought back afterwards."""
    import ray

    from tests.fixtures.ray import start_local_ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    folder = Path(tempfile.mkdtemp(prefix="of26-", dir="/tmp"))  # short: Ray's socket paths
    try:
        os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
        yield folder
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        if had_ray:
            start_local_ray()


@pytest.mark.slow
@pytest.mark.timeout(900)  # three stage runs and two Ray starts: ~160 s on 2 cores at load 10
def test_new_cluster_resumes_from_mlflow_alone(
    mlflow_uri: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Train on S3 + the MLflow server, stop Ray, delete every local folder it or the job wrote,
    start a fresh Ray, `--resume <run id>`: the same run continues from the newest *complete*
    checkpoint (a torn newer one and a corrupted one are passed over by name), metric steps are
    contiguous, and the weights equal an uninterrupted run's, bit for bit on CPU.

    One worker: the determinism claim is about our state (weights, Adam, LR, EMA, RNG, data
    position), not Ray's assignment of blocks to ranks. 6 clips / batch 2 = 3 batches per
    epoch, so the resumed run skips inside an epoch and then crosses into the next one. The
    4-step warm-up makes steps 1-5 independent of train.steps (cosine starts at 1)."""
    import s3fs

    common = [
        "scaling.num_workers=1",
        "data.random_clips=6",
        "train.checkpoint_every=2",
        "train.reliance_every=0",
        "train.warmup_steps=4",
        "mlflow.experiment=new-cluster",
    ]

    def cfg(steps: int, where: str):
        return load_config(CONFIG, [*common, f"train.steps={steps}", f"storage.path={where}"])

    with _own_ray_and_temp() as first_tmp:
        ref = run_stage(cfg(5, f"{s3_bucket}/ref"), "teacher")  # uninterrupted
        part = run_stage(cfg(4, f"{s3_bucket}/job"), "teacher")  # "killed" after step 4
        ray_files = sorted(p.name for p in (first_tmp / "ray").iterdir())
    assert not first_tmp.exists() and "session_latest" in ray_files  # all of it deleted
    client = MlflowClient(mlflow_uri)
    assert client.get_run(part.run_id).info.status == "FINISHED"

    # The run folder in S3: step-2 and step-4 complete; a step-6 torn by a kill mid-upload
    # (part of step 4's files, no meta.json, no manifest); one flipped byte in step 4.
    fs = s3fs.S3FileSystem()
    fs.clear_instance_cache()
    run_dir = part.checkpoint_uri.rsplit("/", 1)[0]
    fs.copy(f"{run_dir}/step-00000004/engines", f"{run_dir}/step-00000006/engines", recursive=True)
    victim = max(fs.find(f"{run_dir}/step-00000004/engines"), key=fs.size)
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))

    t0 = time.monotonic()
    with _own_ray_and_temp(), caplog.at_level(logging.WARNING, "omniforcing.checkpoint"):
        resumed = run_stage(cfg(5, f"{s3_bucket}/job"), "teacher", resume=part.run_id)
    print(f"new cluster: fresh Ray + resume from step 2 to 5 took {time.monotonic() - t0:.1f} s")
    rel = victim.split("/step-00000004/", 1)[1]
    assert [r.getMessage() for r in caplog.records if r.name == "omniforcing.checkpoint"] == [
        f"checkpoint {run_dir}/step-00000006 skipped: no meta.json (incomplete write)",
        f"checkpoint {run_dir}/step-00000004 skipped: "
        f"{rel}: sha256 does not match its manifest (corrupted)",
    ]
    assert resumed.run_id == part.run_id and resumed.step == 5
    assert client.get_run(part.run_id).info.status == "FINISHED"
    assert _losses(mlflow_uri, resumed.run_id) == _losses(mlflow_uri, ref.run_id)  # 1..5, once
    assert [s for s, _ in _losses(mlflow_uri, resumed.run_id)] == [1, 2, 3, 4, 5]
    a, b = _bundle_weights(ref.checkpoint_uri), _bundle_weights(resumed.checkpoint_uri)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_incompatible_resume_is_refused_naming_keys(tmp_path: Path) -> None:
    base = load_config(CONFIG, [f"storage.path={tmp_path}", "mlflow.experiment=refuse"])
    client = MlflowClient(tracking.tracking_uri(base))
    rid = tracking.start_stage_run(client, base, "teacher", "teacher-x")
    changed = load_config(
        CONFIG,
        [
            f"storage.path={tmp_path}",
            "mlflow.experiment=refuse",
            "train.lr=0.5",
            "data.batch_size=4",
        ],
    )
    with pytest.raises(ValueError, match=r"data\.batch_size: 2 -> 4; train\.lr: 0\.003 -> 0\.5"):
        run_stage(changed, "teacher", resume=rid)
    with pytest.raises(ValueError, match="is stage 'teacher', not 'ode'"):
        from pipeline.checkpoint import resolve_storage
        from pipeline.trainer import _open_run

        _open_run(client, base, resolve_storage(base.storage.path), "ode", rid, None)

    from pipeline.cli import app

    res = CliRunner().invoke(
        app,
        [
            "train",
            "teacher",
            "-c",
            str(CONFIG),
            "--set",
            f"storage.path={tmp_path}",
            "--set",
            "mlflow.experiment=refuse",
            "--set",
            "train.lr=0.5",
            "--resume",
            rid,
        ],
    )
    assert res.exit_code == 2 and "train.lr" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        app,
        [
            "train",
            "teacher",
            "-c",
            str(CONFIG),
            "--set",
            f"storage.path={tmp_path}",
            "--resume",
            "f" * 32,
        ],
    )
    assert res.exit_code == 2 and "no such MLflow run" in res.output
