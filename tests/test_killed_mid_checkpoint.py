"""A job SIGKILLed while a checkpoint is being written never loads that checkpoint.

The real thing, not a simulation: `omniforcing train teacher` runs as its own process (its own
Ray), checkpoints to moto S3 through a TCP proxy (tests/fixtures/outage.py) that stalls every
connection at the third PUT of checkpoint 4 — an upload hung half-way. The test then SIGKILLs
every process of the job (driver, Ray's head and workers: the whole session), as a preempted
node would. The same command with `--resume <run id>` reports the torn checkpoint and
continues from checkpoint 2: steps 3..6 recomputed, every metric step logged once, the run
FINISHED in MLflow (it stayed RUNNING while nobody was alive to close it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _command(bucket: str, endpoint: str, *extra: str) -> list[str]:
    sets = [
        "scaling.num_workers=1",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.reliance_every=0",
        f"storage.path={bucket}/job",
        f"storage.endpoint={endpoint}",
        "mlflow.experiment=killed-mid-checkpoint",
    ]
    args = [sys.executable, "-m", "pipeline.cli", "train", "teacher", "--config", str(CONFIG)]
    return args + [a for s in sets for a in ("--set", s)] + list(extra)


def _env(mlflow_server: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    env.pop("RAY_ADDRESS", None)
    return env


def _alive_in_session(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    rows = (line.split() for line in out.splitlines())
    return [int(p) for p, s, stat in rows if int(s) == sid and not stat.startswith("Z")]


def _kill_session(sid: int) -> int:
    """SIGKILL every process whose session is `sid` (the job and the Ray it started), again
    until none is left (one may have been forking meanwhile); returns how many were killed."""
    killed: set[int] = set()
    for _ in range(20):
        pids = _alive_in_session(sid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return len(killed)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_job_killed_mid_checkpoint_resumes_from_the_last_complete(
    mlflow_server: str, s3_bucket: str, s3_proxy, tmp_path: Path
) -> None:
    import s3fs

    frozen = s3_proxy.freeze_at(re.compile(rb"PUT /[^ ]*/step-00000004/"), 3)
    log = (tmp_path / "first.log").open("w")
    job = subprocess.Popen(
        _command(s3_bucket, s3_proxy.url),
        env=_env(mlflow_server),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own session: the kill below takes all of it
    )
    try:
        assert frozen.wait(timeout=600), (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    finally:
        killed = _kill_session(job.pid)
        job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL and killed > 3  # the driver, Ray's head, a worker
    time.sleep(2)
    assert _alive_in_session(job.pid) == []  # nothing of the job lives on
    s3_proxy.thaw()  # S3 answers again (for the checks below and the resume)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("killed-mid-checkpoint")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "RUNNING"  # killed: nobody was left to close it
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_proxy.url})
    torn = fs.glob(f"{s3_bucket}/job/*/step-00000004")
    assert len(torn) == 1  # part of checkpoint 4 reached S3, not all of it
    complete = fs.find(torn[0].replace("step-00000004", "step-00000002"))
    assert 0 < len(fs.find(torn[0])) < len(complete)

    t0 = time.monotonic()
    resumed = subprocess.run(
        _command(s3_bucket, s3_proxy.url, "--resume", run.info.run_id),
        env=_env(mlflow_server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = resumed.stdout + resumed.stderr
    print(f"resume took {time.monotonic() - t0:.1f} s")
    assert resumed.returncode == 0, out[-3000:]
    assert re.search(
        rf"checkpoint s3://{re.escape(torn[0])} skipped: .*\(incomplete write\)", out
    ), out[-3000:]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.tags[tracking.CKPT_TAG].endswith("step-00000006")
    assert after.data.tags[tracking.EXPORT_TAG] == "bundle"
