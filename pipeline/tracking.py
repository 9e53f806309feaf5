"""MLflow tracking: where the store is, runs per stage, idempotent metric logging, artifacts.

Holds the tracking-URI resolution (config → $MLFLOW_TRACKING_URI → sqlite in the run folder),
creating/continuing stage runs (child of a pipeline parent run), looking runs up for `--resume`,
and `MetricLogger`, which never logs a step twice so that a restarted job keeps contiguous metric
steps. It does not decide *what* to log (stages do) and imports no Ray or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import JobConfig
from pipeline.fingerprint import flatten

STAGE_TAG = "omniforcing.stage"
RAY_NAME_TAG = "omniforcing.ray_run_name"
CKPT_TAG = "omniforcing.checkpoint_uri"
CKPT_STEP_TAG = "omniforcing.checkpoint_step"
FINGERPRINT_TAG = "omniforcing.fingerprint"
STATUS_TAG = "omniforcing.status"  # running | finished | failed | killed
EXPORT_TAG = "omniforcing.export"  # artifact path of the consolidated Bundle
SINGLE_TAG_PREFIX = "omniforcing.single."  # a run recorded afterwards by `pipeline.single log`
CONFIG_ARTIFACT = "config/resolved.json"


def tracking_uri(cfg: JobConfig) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store in the local run folder."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = cfg.storage.path if "://" not in cfg.storage.path else "runs"
    Path(folder).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether the tracking server answers its health check; stores that are not servers
    (sqlite, a folder) are always reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def start_stage_run(
    client: MlflowClient, cfg: JobConfig, stage: str, ray_name: str, parent: str | None = None
) -> str:
    """Create the stage's run, log the flattened resolved config as params and as JSON."""
    from pipeline.fingerprint import fingerprint

    tags = {
        STAGE_TAG: stage,
        RAY_NAME_TAG: ray_name,
        FINGERPRINT_TAG: fingerprint(cfg),
        STATUS_TAG: "running",
        "mlflow.runName": f"{stage}-{ray_name[-8:]}",
    }
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id(client, cfg.mlflow.experiment), tags=tags)
    run_id = run.info.run_id
    params = [
        Param(k, json.dumps(v) if not isinstance(v, str) else v)
        for k, v in flatten(cfg.to_dict()).items()
    ]
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i : i + 100])
    log_json(client, run_id, cfg.to_dict(), CONFIG_ARTIFACT)
    return run_id


def log_json(client: MlflowClient, run_id: str, obj: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(artifact_file).name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(p), str(Path(artifact_file).parent))


def load_run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The resolved config a run was started with (its JSON artifact)."""
    with tempfile.TemporaryDirectory() as d:
        path = client.download_artifacts(run_id, CONFIG_ARTIFACT, d)
        return json.loads(Path(path).read_text())


def find_run(client: MlflowClient, experiment: str, ref: str, stage: str | None = None) -> Any:
    """A run by id, or "latest": the newest run of `stage` in the experiment."""
    if ref != "latest":
        try:
            return client.get_run(ref)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"--resume {ref!r}: no such MLflow run") from None
    exp = client.get_experiment_by_name(experiment)
    filt = f"tags.`{STAGE_TAG}` = '{stage}'" if stage else ""
    runs = (
        client.search_runs(
            [exp.experiment_id], filt, order_by=["attributes.start_time DESC"], max_results=1
        )
        if exp
        else []
    )
    if not runs:
        raise ValueError(f"--resume latest: no {stage or ''} run in experiment {experiment!r}")
    return runs[0]


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """A resumed run is RUNNING again (MLflow's status and our tag) until `run_status` ends it."""
    client.update_run(run_id, status="RUNNING")
    set_tags(client, run_id, {STATUS_TAG: "running"})


@contextmanager
def run_status(client: MlflowClient, run_id: str) -> Iterator[None]:
    """End `run_id` with MLflow's own status when the body ends: FINISHED when it returns,
    KILLED on KeyboardInterrupt (and SIGTERM, see `sigterm_as_interrupt`), FAILED when it
    raises anything else. Our STATUS_TAG follows, except that "finished" stays the stage's own
    word (set when its final checkpoint is published), so a run without an export keeps
    "running" in the tag while MLflow says FINISHED."""
    try:
        yield
    except KeyboardInterrupt:
        _end(client, run_id, "KILLED")
        raise
    except BaseException:
        _end(client, run_id, "FAILED")
        raise
    _end(client, run_id, "FINISHED")


def _end(client: MlflowClient, run_id: str, status: str) -> None:
    if not reachable(client.tracking_uri):  # MLflow's own retries would hold us for minutes
        print(
            f"warning: could not mark MLflow run {run_id} {status}: the tracking server "
            f"{client.tracking_uri} does not answer; `--resume {run_id}` reopens and ends it",
            flush=True,
        )
        return
    try:
        if status != "FINISHED":
            set_tags(client, run_id, {STATUS_TAG: status.lower()})
        client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 — never hide the error that ended the run
        print(f"warning: could not mark MLflow run {run_id} {status}: {err}", flush=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`ray job stop`, a pod deleted, `kill`) raises KeyboardInterrupt in the main
    thread while the body runs, so `run_status` marks the run KILLED instead of leaving it
    RUNNING forever. Outside the main thread (signals cannot be set there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class MetricLogger:
    """Logs per-step metrics to one run, skipping steps already logged (restart idempotence).

    A restarted worker recomputes the steps after its checkpoint; those up to the run's last
    logged step are dropped here so the history has each step exactly once.
    """

    def __init__(self, uri: str, run_id: str, probe_key: str = "loss") -> None:
        self.client = client_for(uri)
        self.run_id = run_id
        hist = self.client.get_metric_history(run_id, probe_key)
        self.last_logged = max((m.step for m in hist), default=-1)  # step 0: a start

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_logged or not metrics:
            return
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)
        self.last_logged = step if "loss" in metrics else self.last_logged

    def history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        out = {}
        for k in keys:
            hist = sorted(self.client.get_metric_history(self.run_id, k), key=lambda m: m.step)
            out[k] = [(m.step, m.value) for m in hist]
        return out

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
