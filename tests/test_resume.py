"""Resume: a killed worker is replaced and the job finishes with contiguous metric steps;
interrupted + `--resume` equals uninterrupted (bit-exact weights on CPU); an incompatible config
is refused naming the differing keys. Real local Ray, real DeepSpeed, sqlite MLflow."""

from __future__ import annotations

import os
import signal
import threading
import time
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
    return load_file(str(Path(ckpt_uri) / "bundle" / "model.safetensors"))


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(ray_local, tmp_path: Path) -> None:
    # One worker: the determinism claim is about our state (weights, Adam, LR, EMA, RNG, data
    # position), not Ray's assignment of blocks to ranks. 6 clips / batch 2 = 3 batches per
    # epoch, so the resumed run must skip inside an epoch and then cross into the next one.
    common = [
        "scaling.num_workers=1",
        "data.random_clips=6",
        "train.checkpoint_every=2",
        "train.reliance_every=0",
        "train.warmup_steps=2",
    ]
    full = load_config(
        CONFIG,
        [*common, "train.steps=5", f"storage.path={tmp_path / 'a'}", "mlflow.experiment=det"],
    )
    ref = run_stage(full, "teacher")

    part = load_config(
        CONFIG,
        [*common, "train.steps=2", f"storage.path={tmp_path / 'b'}", "mlflow.experiment=det"],
    )
    first = run_stage(part, "teacher")
    assert first.step == 2
    more = load_config(
        CONFIG,
        [*common, "train.steps=5", f"storage.path={tmp_path / 'b'}", "mlflow.experiment=det"],
    )
    resumed = run_stage(more, "teacher", resume="latest")
    assert resumed.run_id == first.run_id and resumed.step == 5
    assert _steps(resumed.tracking_uri, resumed.run_id) == [1, 2, 3, 4, 5]

    a, b = _bundle_weights(ref.checkpoint_uri), _bundle_weights(resumed.checkpoint_uri)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    la = [
        m.value
        for m in sorted(
            MlflowClient(ref.tracking_uri).get_metric_history(ref.run_id, "loss"),
            key=lambda m: m.step,
        )
    ]
    lb = [
        m.value
        for m in sorted(
            MlflowClient(resumed.tracking_uri).get_metric_history(resumed.run_id, "loss"),
            key=lambda m: m.step,
        )
    ]
    assert la == lb


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
        from pipeline.trainer import _open_run

        _open_run(client, base, "ode", rid, None)

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
