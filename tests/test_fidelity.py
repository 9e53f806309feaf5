"""Fidelity while training (pipeline/fidelity.py, `train.fidelity`): figures at the configured
steps, the teacher's reference once per run, the best-step tags from the logged values, a resumed
run that keeps its best, `every: 0` costing nothing, and `promote` registering the best step's
weights (not the last) and saying so. The watcher's unit tests use a recording logger and
scripted figures; one run goes through the real trainer (Ray, DeepSpeed, MLflow server)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import fidelity, tracking
from pipeline.config import ConfigError, load_config, validate
from pipeline.fingerprint import fingerprint
from pipeline.registry import describe
from pipeline.stages import WorkerContext

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """The rank-0 logger's API (pipeline/outbox.py), recording calls; `tags` seed the run."""

    def __init__(self, tags: dict[str, str] | None = None) -> None:
        self.run_id, self.calls, self.tags = "run", [], dict(tags or {})
        self.metrics: dict[str, dict[int, float]] = {}
        rec = self

        class Client:
            def get_run(self, _rid: str) -> Any:
                return type("R", (), {"data": type("D", (), {"tags": dict(rec.tags)})})

        self.client = Client()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("metrics", step, dict(metrics)))
        for k, v in metrics.items():
            self.metrics.setdefault(k, {})[step] = v

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.calls.append(("tags", dict(tags)))
        self.tags |= {k: str(v) for k, v in tags.items()}

    def log_artifacts(self, folder: str | Path, path: str | None = None) -> None:
        self.calls.append(("artifacts", path, sorted(p.name for p in Path(folder).iterdir())))

    def history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        return {k: sorted(self.metrics.get(k, {}).items()) for k in keys}


class FakeStage:
    """A stage whose export writes a real tiny Bundle; `teacher` is a tiny bidirectional one."""

    name = "self-forcing"

    def __init__(self) -> None:
        from model.testing import tiny_bundle

        self.teacher = tiny_bundle(seed=0, causal=False)
        self.exports = 0

    def export(self, out_dir: Path | None, ctx: WorkerContext) -> None:
        from model.testing import tiny_bundle

        self.exports += 1
        if out_dir is not None:
            tiny_bundle(seed=self.exports, causal=True).save_pretrained(out_dir)


def _ctx(every: int, best_by: str = "sync_40ms", at_start: bool = True) -> WorkerContext:
    fc = {"every": every, "clips": 1, "best_by": best_by, "at_start": at_start}
    cfg = validate(
        {
            "model": {"preset": "tiny"},
            "data": {"source": "random", "seconds": 1},
            "train": {"fidelity": fc},
        }
    )
    return WorkerContext(cfg, 0, 1, torch.device("cpu"), torch.float32)


def _scripted(monkeypatch: pytest.MonkeyPatch, student: list[float], teacher: float) -> list:
    """figures(): the teacher (bidirectional bundle) gets `teacher`, each student call the next
    value of `student` as its sync share; records which kind was scored."""
    seen, values = [], iter(student)

    def fake(bundle: Any, cfg: Any) -> dict[str, float]:
        kind = "student" if bundle.config.causal else "teacher"
        seen.append(kind)
        v = teacher if kind == "teacher" else next(values)
        return {"sync_40ms": v, "median_offset_ms": 100 * (1 - v), "reversals_per_clip": 3.0,
                "direction_acc": math.nan}  # fmt: skip

    monkeypatch.setattr(fidelity, "figures", fake)
    return seen


def test_config_key_is_typed_strict_and_resume_free() -> None:
    cfg = load_config("configs/tiny.yaml")
    assert cfg.train.fidelity.every == 0  # off unless asked: tests and demo stay fast
    with pytest.raises(ConfigError, match="train.fidelity.evry: unknown key"):
        load_config("configs/tiny.yaml", ["train.fidelity.evry=3"])
    with pytest.raises(ConfigError, match="train.fidelity.best_by"):
        load_config("configs/tiny.yaml", ["train.fidelity.best_by=loss"])
    on = load_config("configs/tiny.yaml", ["train.fidelity.every=2", "train.fidelity.clips=8"])
    assert fingerprint(on) == fingerprint(cfg)  # measuring never blocks a resume


def test_metrics_teacher_once_and_best_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _scripted(monkeypatch, [0.2, 0.5, 0.4], teacher=0.7)
    log, stage, ctx = Recorder(), FakeStage(), _ctx(every=2)
    watch = fidelity.Watcher(stage, ctx, log)
    assert seen == ["teacher"]  # at the start, before any step
    assert json.loads(log.tags[fidelity.TEACHER_TAG])["sync_40ms"] == 0.7
    for step in range(1, 7):
        watch(step)
    assert seen == ["teacher", "student", "student", "student"] and stage.exports == 3
    assert sorted(log.metrics["fidelity/sync_40ms"].items()) == [(2, 0.2), (4, 0.5), (6, 0.4)]
    assert "fidelity/direction_acc" not in log.metrics  # NaN figures are not logged
    assert log.metrics["fidelity/teacher/sync_40ms"] == {2: 0.7}  # once, beside the first
    assert not any("loss" in m for c in log.calls if c[0] == "metrics" for m in c[2])
    assert (log.tags[fidelity.BEST_STEP_TAG], log.tags[fidelity.BEST_VALUE_TAG]) == ("4", "0.5")
    assert log.tags[fidelity.BEST_METRIC_TAG] == "fidelity/sync_40ms"
    assert log.tags[fidelity.BEST_EXPORT_TAG] == "best/step-00000004"
    bundles = [c for c in log.calls if c[0] == "artifacts" and c[1].startswith("best/")]
    assert [c[1] for c in bundles] == ["best/step-00000002", "best/step-00000004"]
    assert "model.safetensors" in bundles[0][2]

    # Each best bundle is logged before the tags that name it.
    def at(kind: str, path: str) -> int:
        return next(
            i for i, c in enumerate(log.calls)
            if c[0] == kind and path in (c[1] if kind == "artifacts" else c[1].values())
        )  # fmt: skip

    assert at("artifacts", "best/step-00000004") < at("tags", "best/step-00000004")
    assert ("artifacts", "plots", ["fidelity.png"]) in log.calls


def test_resume_keeps_best_and_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relaunch reads the run's tags: no second teacher evaluation, and a later step only
    becomes the best by beating the value the run already holds."""
    seen = _scripted(monkeypatch, [0.45, 0.6], teacher=0.7)
    tags = {fidelity.TEACHER_TAG: json.dumps({"sync_40ms": 0.7}), fidelity.BEST_STEP_TAG: "4",
            fidelity.BEST_VALUE_TAG: "0.5", fidelity.BEST_METRIC_TAG: "fidelity/sync_40ms"}  # fmt: skip
    log = Recorder(tags)
    watch = fidelity.Watcher(FakeStage(), _ctx(every=2), log)
    watch(6)
    assert (
        log.tags[fidelity.BEST_STEP_TAG] == "4" and "fidelity/teacher/sync_40ms" not in log.metrics
    )
    watch(8)
    assert seen == ["student", "student"]
    assert (log.tags[fidelity.BEST_STEP_TAG], log.tags[fidelity.BEST_VALUE_TAG]) == ("8", "0.6")


def test_the_start_competes_as_step_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh start evaluates its starting weights as step 0: when every later step is worse,
    step 0 stays the best (what `promote` registers), so a stage that only makes its student
    worse never promotes a worse one. A resumed run (start > 0) and `at_start: false` skip it."""
    seen = _scripted(monkeypatch, [0.6, 0.3, 0.5], teacher=0.7)
    log, stage = Recorder(), FakeStage()
    watch = fidelity.Watcher(stage, _ctx(every=2), log)
    watch.start(0)
    for step in range(1, 5):
        watch(step)
    assert sorted(log.metrics["fidelity/sync_40ms"].items()) == [(0, 0.6), (2, 0.3), (4, 0.5)]
    assert log.metrics["fidelity/teacher/sync_40ms"] == {0: 0.7}
    assert (log.tags[fidelity.BEST_STEP_TAG], log.tags[fidelity.BEST_EXPORT_TAG]) == (
        "0",
        "best/step-00000000",
    )
    assert seen == ["teacher", "student", "student", "student"] and stage.exports == 3
    what = {"which": "best", "step": 0, "metric": "fidelity/sync_40ms", "value": 0.6}
    assert describe("r1", what).startswith("step 0 (the stage's starting weights) of run r1")

    _scripted(monkeypatch, [0.4], teacher=0.7)
    resumed, stage = Recorder(), FakeStage()
    fidelity.Watcher(stage, _ctx(every=2), resumed).start(6)
    assert stage.exports == 0 and "fidelity/sync_40ms" not in resumed.metrics
    stage = FakeStage()
    fidelity.Watcher(stage, _ctx(every=2, at_start=False), Recorder()).start(0)
    assert stage.exports == 0


def test_lower_is_better_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    _scripted(monkeypatch, [0.2, 0.5, 0.4], teacher=0.7)  # offsets 80, 50, 60 ms
    log = Recorder()
    watch = fidelity.Watcher(FakeStage(), _ctx(every=1, best_by="median_offset_ms"), log)
    for step in (1, 2, 3):
        watch(step)
    assert log.tags[fidelity.BEST_STEP_TAG] == "2"
    assert (
        fidelity.better(math.nan, None, True) is False and fidelity.better(1.0, 1.0, True) is False
    )


def test_every_zero_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _scripted(monkeypatch, [], teacher=0.7)
    log, stage = Recorder(), FakeStage()
    watch = fidelity.Watcher(stage, _ctx(every=0), log)
    for step in range(1, 50):
        watch(step)
    assert seen == [] and stage.exports == 0 and log.calls == []


def test_non_zero_ranks_join_the_export_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _scripted(monkeypatch, [], teacher=0.7)
    stage = FakeStage()
    watch = fidelity.Watcher(stage, _ctx(every=2), None)  # rank > 0: no logger
    for step in range(1, 5):
        watch(step)
    assert stage.exports == 2 and seen == []  # the collective gather, no evaluation


def test_figures_leave_the_training_rng_alone() -> None:
    from model.testing import tiny_bundle

    bundle, cfg = tiny_bundle(seed=0, causal=True), _ctx(every=1).cfg
    state = torch.get_rng_state()
    out = fidelity.figures(bundle, cfg)
    assert set(out) == set(fidelity.FIGURES) and 0.0 <= out["sync_40ms"] <= 1.0
    assert torch.equal(state, torch.get_rng_state())


def check_fidelity_run(client: Any, run_id: str, steps: list[int]) -> int | None:
    """Assert what a real run with `train.fidelity.every` logged (tests/test_self_forcing.py):
    the evaluation at `steps` beside the losses, the teacher's reference once, and best tags that
    match the logged values (the first step with the best sync share). Returns the best step."""
    hist = {m: client.get_metric_history(run_id, m) for m in ("fidelity/eval_s", "loss")}
    assert [m.step for m in hist["fidelity/eval_s"]] == steps
    assert sorted(m.step for m in hist["loss"]) == list(range(1, steps[-1] + 1))
    teacher = client.get_metric_history(run_id, "fidelity/teacher/median_offset_ms")
    assert [m.step for m in teacher] == steps[:1]  # once, at the first evaluation
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags[fidelity.TEACHER_TAG])["median_offset_ms"] == teacher[0].value
    sync = sorted(
        (m.step, m.value) for m in client.get_metric_history(run_id, "fidelity/sync_40ms")
    )
    if not sync:  # no contact seen in any clip: no best, promote takes the last
        assert fidelity.BEST_STEP_TAG not in tags
        return None
    step, value = max(sync, key=lambda sv: (sv[1], -sv[0]))
    assert (int(tags[fidelity.BEST_STEP_TAG]), float(tags[fidelity.BEST_VALUE_TAG])) == (
        step,
        value,
    )
    assert tags[fidelity.BEST_EXPORT_TAG] == f"best/step-{step:08d}"
    return step


@pytest.mark.slow
def test_promote_registers_the_best_step_and_says_so(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from model.testing import tiny_bundle
    from pipeline.cli import app
    from pipeline.registry import chosen_bundle, load_bundle

    client = MlflowClient(mlflow_uri)
    cfg = load_config("configs/tiny.yaml", ["mlflow.experiment=fidelity-promote"])
    rid = tracking.start_stage_run(client, cfg, "self-forcing", "sf-best")
    for seed, path in ((1, "bundle"), (2, "best/step-00000004")):
        tiny_bundle(seed=seed, causal=True).save_pretrained(tmp_path / str(seed))
        client.log_artifacts(rid, str(tmp_path / str(seed)), path)
    tracking.set_tags(client, rid, {
        tracking.EXPORT_TAG: "bundle", tracking.STATUS_TAG: "finished", tracking.CKPT_STEP_TAG: "6",
        fidelity.BEST_STEP_TAG: "4", fidelity.BEST_VALUE_TAG: "0.5",
        fidelity.BEST_METRIC_TAG: "fidelity/sync_40ms", fidelity.BEST_EXPORT_TAG: "best/step-00000004",
    })  # fmt: skip

    def same(uri: str, seed: int) -> bool:
        got, ref = load_bundle(uri).model.state_dict(), load_bundle(str(tmp_path / str(seed)))
        return all(torch.equal(v, ref.model.state_dict()[k]) for k, v in got.items())

    sets = ["-c", "configs/tiny.yaml", "--set", f"mlflow.tracking_uri={mlflow_uri}"]
    res = CliRunner().invoke(
        app, ["promote", "--run", rid, "--name", "fid-best", *sets], env={"COLUMNS": "250"}
    )
    assert res.exit_code == 0, res.output
    assert "step 4 of run" in res.output and "best evaluated step" in res.output
    assert same("models:/fid-best@champion", 2)  # the best step's weights,
    assert not same("models:/fid-best@champion", 1)  # not the last's
    version = client.get_model_version_by_alias("fid-best", "champion")
    assert version.description.startswith("step 4 of run") and "fidelity/sync_40ms = 0.5" in (
        version.description
    )
    run = client.get_run(rid)
    assert chosen_bundle(run, "last") == ("bundle", {"which": "last", "step": 6})  # --last
    tracking.set_tags(client, rid, {fidelity.BEST_EXPORT_TAG: ""})  # a run that kept no best
    assert chosen_bundle(client.get_run(rid))[1]["which"] == "last"
