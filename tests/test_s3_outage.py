"""S3 unreachable for some seconds during training (the endpoint's port closed, then open again
with its data, tests/fixtures/outage.py): checkpoint uploads retry with backoff and the run
finishes with every step logged once; an endpoint that stays away fails the call after the
retry budget with a message naming the URL and key (never a hang). Real local Ray, real
DeepSpeed, moto S3, sqlite MLflow."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.trainer import run_stage

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, bucket: str, endpoint: str, *extra: str):
    return load_config(
        CONFIG,
        [
            "scaling.num_workers=1",
            "scaling.max_failures=0",  # the retries alone must ride the outage out
            "train.steps=4",
            "train.checkpoint_every=2",
            "train.reliance_every=0",
            f"storage.path={bucket}/run",
            f"storage.endpoint={endpoint}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.experiment=outage",
            *extra,
        ],
    )


def _outage_over_an_upload(cfg, proxy, seconds: float, log: dict) -> threading.Thread:
    """Close the endpoint once checkpoint 2 is recorded; keep it closed until step 4 is logged
    (its checkpoint upload starts right after) and `seconds` more, so the outage always
    overlaps an upload however slow the steps are; then open it again."""
    client = MlflowClient(cfg.mlflow.tracking_uri)
    log["end"] = threading.Event()  # set: the outage ends now

    def tag_step() -> int:
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return int(runs[0].data.tags.get(tracking.CKPT_STEP_TAG, 0)) if runs else 0

    def logged_step() -> int:
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        hist = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
        return max((m.step for m in hist), default=0)

    def wait_for(check, deadline: float) -> None:
        while not check() and time.monotonic() < deadline and not log["end"].is_set():
            time.sleep(0.05)

    def run() -> None:
        deadline = time.monotonic() + 500
        wait_for(lambda: tag_step() >= 2, deadline)
        proxy.down()
        log["down_at"] = time.monotonic()
        wait_for(lambda: logged_step() >= 4, deadline)
        log["end"].wait(seconds)
        log["checkpoint_step_at_up"] = tag_step()
        proxy.up()
        log["up_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_short_s3_outage_is_ridden_out(ray_local, s3_bucket, s3_proxy, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, s3_bucket, s3_proxy.url)
    log: dict = {}
    thread = _outage_over_an_upload(cfg, s3_proxy, 15.0, log)
    res = run_stage(cfg, "teacher")
    done = time.monotonic()
    thread.join(30)
    client = MlflowClient(res.tracking_uri)
    steps = sorted(m.step for m in client.get_metric_history(res.run_id, "loss"))
    print(
        f"S3 down {log['up_at'] - log['down_at']:.1f} s; checkpoint 4 was still uploading when it "
        f"came back (recorded step then: {log['checkpoint_step_at_up']}); the run finished "
        f"{done - log['up_at']:.1f} s later"
    )
    assert log["checkpoint_step_at_up"] == 2  # the step-4 upload waited for the endpoint
    assert res.step == 4 and steps == list(range(1, 5))  # nothing lost, nothing twice
    assert client.get_run(res.run_id).info.status == "FINISHED"


def test_s3_calls_wait_for_the_endpoint_or_fail_naming_it(
    s3_bucket: str, s3_proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry loop itself, on the storage filesystem the trainer builds (botocore's own
    retries off here, so only ours run): a 3 s outage is waited out with one log line per
    wait; an endpoint that stays away fails after the budget with the URL and the key."""
    from pipeline.s3 import RetryingS3FileSystem

    bucket = s3_bucket.removeprefix("s3://")
    fs = RetryingS3FileSystem(
        endpoint_url=s3_proxy.url, config_kwargs={"retries": {"max_attempts": 1}}, retry_s=20
    )
    s3_proxy.down()
    threading.Timer(3.0, s3_proxy.up).start()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "omniforcing.s3"):
        fs.pipe_file(f"{bucket}/ck/meta.json", b"{}")  # what a checkpoint upload does
    assert 3.0 <= time.monotonic() - t0 < 15 and fs.cat_file(f"{bucket}/ck/meta.json") == b"{}"
    assert caplog.records and "S3 unreachable (EndpointConnectionError): put_object" in (
        caplog.records[0].getMessage()
    )
    s3_proxy.down()
    short = RetryingS3FileSystem(
        endpoint_url=s3_proxy.url, config_kwargs={"retries": {"max_attempts": 1}}, retry_s=2
    )
    t0 = time.monotonic()
    with pytest.raises(OSError, match=rf"{s3_proxy.url} s3://{bucket}/ck/meta.json failed for"):
        short.cat_file(f"{bucket}/ck/meta.json")
    assert time.monotonic() - t0 < 10  # the budget, not a hang
