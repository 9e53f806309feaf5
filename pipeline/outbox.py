"""MLflow writes that survive the tracking server going away: `TrackingOutbox`.

A training worker's metrics, tags and artifacts go into an ordered outbox that a background
thread sends, so a step never waits on the tracking server. While the server is unreachable
(probed at `<uri>/health`, then backoff 1, 2, 4, … 30 s) the outbox keeps everything in order
and the run trains on; when the server answers again the backlog is sent, oldest first. The
unsent metrics and tags are saved with every checkpoint (`tracking/outbox.json`), so a job that
dies, or ends while the server is still away, logs them when it is resumed: nothing is lost and
nothing is logged twice (steps the run already has are dropped, as `MetricLogger` does).

Artifacts (loss curves, sample clips) are copied into the outbox when queued; they are not
saved with checkpoints: the loss curve is redrawn at the end of every launch.

Deliberately NOT here: what to log (stages), run creation and status (pipeline.tracking).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from pipeline.tracking import client_for, reachable

log = logging.getLogger("omniforcing.tracking")
RETRY_ENV = "OMNIFORCING_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 300.0
OUTBOX_FILE = "tracking/outbox.json"


def retry_budget() -> float:
    """Seconds to wait for an unreachable tracking server ($OMNIFORCING_MLFLOW_RETRY_S, read
    where the job is launched and passed on to the workers)."""
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def wait_reachable(uri: str, budget_s: float, what: str) -> None:
    """Return once the server answers; after `budget_s` of silence raise `TrackingUnreachable`
    naming the server and `what` was being done."""
    t0, delay = time.monotonic(), 1.0
    while not reachable(uri):
        waited = time.monotonic() - t0
        if waited >= budget_s:
            raise TrackingUnreachable(f"MLflow server {uri} unreachable for {waited:.0f} s {what}")
        if delay == 1.0:
            log.warning("MLflow server %s unreachable %s; retrying for %.0f s", uri, what, budget_s)
        time.sleep(min(delay, max(budget_s - waited, 0.1)))
        delay = min(delay * 2, 30.0)


class TrackingUnreachable(RuntimeError):
    """The tracking server did not answer within the retry budget."""


class TrackingOutbox:
    """Ordered MLflow writes for one run, sent by a daemon thread (see the module docstring).

    Ops: ("metrics", step, [[key, value, ts], …]), ("tags", {key: value}),
    ("artifacts", local folder it owns, artifact path)."""

    def __init__(self, uri: str, run_id: str, probe_key: str = "loss") -> None:
        self.uri, self.run_id, self.probe_key = uri, run_id, probe_key
        self.client = client_for(uri)
        self.last_logged: int | None = None  # the run's last step with `probe_key`, once known
        self._ops: deque[tuple] = deque()
        self._seen: dict[str, dict[int, float]] = {}  # what this process logged, for plots
        self._cv = threading.Condition()
        self._stopped = False
        self._down_since: float | None = None
        self._spool = Path(tempfile.mkdtemp(prefix="omni-outbox-"))
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self._thread.start()

    # -- what the worker calls (never blocks on the server) -------------------------------
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self._put(("metrics", step, [[k, float(v), ts] for k, v in metrics.items()]))
        for k, v in metrics.items():
            self._seen.setdefault(k, {})[step] = float(v)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        own = Path(tempfile.mkdtemp(dir=self._spool))
        shutil.copytree(folder, own, dirs_exist_ok=True)
        self._put(("artifacts", str(own), artifact_path))

    def history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) per key: the server's history (when it answers) and this process's."""
        out = {}
        for k in keys:
            merged = {}
            if reachable(self.uri):
                try:
                    hist = self.client.get_metric_history(self.run_id, k)
                    merged = {m.step: m.value for m in hist}
                except Exception:  # noqa: BLE001 — a plot from what we have beats no plot
                    pass
            merged |= self._seen.get(k, {})
            out[k] = sorted(merged.items())
        return out

    def pending(self) -> dict[str, Any]:
        """The unsent metrics and tags, as JSON-able data for a checkpoint."""
        with self._cv:
            ops = [op for op in self._ops if op[0] != "artifacts"]
        return {"run_id": self.run_id, "ops": [list(op) for op in ops]}

    def restore(self, saved: dict[str, Any]) -> int:
        """Queue what a checkpoint saved as unsent, ahead of anything new; returns how many."""
        ops = (
            [tuple(op) for op in saved.get("ops", [])] if saved.get("run_id") == self.run_id else []
        )
        with self._cv:
            self._ops.extendleft(reversed(ops))
            self._cv.notify_all()
        for kind, *rest in ops:
            if kind == "metrics":
                step, rows = rest
                for k, v, _ts in rows:
                    self._seen.setdefault(k, {})[step] = v
        return len(ops)

    def close(self, budget_s: float) -> int:
        """Wait up to `budget_s` for the backlog to be sent; returns how many ops are left.
        Nothing is sent after this returns (what is left lives on in the last checkpoint)."""
        deadline = time.monotonic() + budget_s
        with self._cv:
            self._cv.notify_all()
            while self._ops and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            left = len(self._ops)
            self._stopped = True
            self._cv.notify_all()
        if not left:
            shutil.rmtree(self._spool, ignore_errors=True)
        return left

    def describe(self, ops: list[tuple] | None = None) -> str:
        """'N metric steps (a-b), K tag sets, J artifact folders' of the backlog."""
        with self._cv:
            ops = list(self._ops) if ops is None else ops
        steps = [op[1] for op in ops if op[0] == "metrics"]
        span = f" ({min(steps)}-{max(steps)})" if steps else ""
        n = {kind: sum(op[0] == kind for op in ops) for kind in ("tags", "artifacts")}
        return f"{len(steps)} metric steps{span}, {n['tags']} tag sets, {n['artifacts']} artifact folders"

    # -- the sending thread -----------------------------------------------------------------
    def _put(self, op: tuple) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify_all()

    def _run(self) -> None:
        delay, refused = 1.0, 0
        while True:
            with self._cv:
                while not self._ops and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                op = self._ops[0]
            try:
                if not reachable(self.uri):
                    raise ConnectionError("health check failed")
                self._send(op)
            except Exception as err:  # noqa: BLE001 — keep it, say so once, try again later
                # A server that answers its health check but refuses the same write 3 times
                # (a bad value, a key too long) must not hold every later write back.
                refused = refused + 1 if reachable(self.uri) else 0
                if refused < 3:
                    self._went_down(err)
                    with self._cv:
                        self._cv.wait_for(lambda: self._stopped, delay)
                    delay = min(delay * 2, 30.0)
                    continue
                log.error("MLflow refused %s for run %s: %s; dropped", op[:2], self.run_id, err)
            delay, refused = 1.0, 0
            with self._cv:
                if self._stopped:
                    return  # sent during close's last moment: the checkpoint has it too
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
                self._cv.notify_all()
                self._came_back()

    def _send(self, op: tuple) -> None:
        if self.last_logged is None:
            hist = self.client.get_metric_history(self.run_id, self.probe_key)
            self.last_logged = max((m.step for m in hist), default=-1)  # step 0: a start
        kind = op[0]
        if kind == "metrics":
            _, step, rows = op
            if step <= self.last_logged:
                return  # logged before a restart: each step exactly once
            metrics = [Metric(k, v, ts, step) for k, v, ts in rows]
            self.client.log_batch(self.run_id, metrics=metrics)
            if any(k == self.probe_key for k, _, _ in rows):
                self.last_logged = step
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()])
        else:
            _, folder, artifact_path = op
            self.client.log_artifacts(self.run_id, folder, artifact_path)
            shutil.rmtree(folder, ignore_errors=True)

    def _went_down(self, err: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "MLflow server %s unreachable (%s): buffering run %s's metrics, training goes on",
                self.uri,
                str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
                self.run_id,
            )

    def _came_back(self) -> None:
        if self._down_since is not None and not self._ops:
            log.warning(
                "MLflow server %s back after %.0f s: backlog sent",
                self.uri,
                time.monotonic() - self._down_since,
            )
            self._down_since = None


def save_pending(outbox: TrackingOutbox, checkpoint_dir: Path) -> None:
    """Write the unsent metrics and tags into a checkpoint being staged (nothing if none)."""
    pending = outbox.pending()
    if pending["ops"]:
        path = checkpoint_dir / OUTBOX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(pending))


def load_pending(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / OUTBOX_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
