"""Fidelity while training: evaluate the student every `train.fidelity.every` steps, keep the best.

`Watcher(stage, ctx, logger)` is built once per worker before the loop (pipeline.worker_loop),
`start(step)` evaluates the starting weights as step 0 on a fresh start (`at_start`), and it is
called after every optimizer step. At an evaluation step every rank joins the stage's collective
`export` (so ZeRO-3's gather works), and rank 0 loads the exported Bundle (the EMA weights when
EMA is on: what `promote` registers), streams the fixed prompt/seed set and scores it with
`pipeline.evaluate` (sync share within 40 ms, median offset, reversals, caption direction). The
figures go to MLflow as `fidelity/<name>` at that step; the teacher's on the same prompts and seeds
are computed once per run (tag `omniforcing.fidelity.teacher`, metrics `fidelity/teacher/<name>`
at the first evaluation, a dashed reference line in `plots/fidelity.png`). A step that beats the
best so far by `best_by` is logged as the artifact `best/step-<n>` (outside Ray's checkpoint
retention) and named by the `omniforcing.best_*` tags; a resumed run reads them back.

It does not decide when the loop runs (pipeline.worker_loop), measure clips (pipeline.evaluate)
or register models (pipeline.registry).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.stages import WorkerContext

log = logging.getLogger("omniforcing.fidelity")

# figure name -> (evaluate() report key, whether higher is better; None: not a ranking figure)
FIGURES: dict[str, tuple[str, bool | None]] = {
    "sync_40ms": ("contact_recall", True),
    "median_offset_ms": ("median_offset_ms", False),
    "reversals_per_clip": ("reversals_per_clip", None),
    "direction_acc": ("direction_acc", True),
}
PREFIX = "fidelity/"
TEACHER_PREFIX = "fidelity/teacher/"
TEACHER_TAG = "omniforcing.fidelity.teacher"  # JSON {figure: value} of the teacher, once per run
BEST_STEP_TAG = "omniforcing.best_step"
BEST_VALUE_TAG = "omniforcing.best_value"
BEST_METRIC_TAG = "omniforcing.best_metric"  # e.g. fidelity/sync_40ms
BEST_EXPORT_TAG = "omniforcing.best_export"  # artifact path of the best step's Bundle


def prompts(cfg: Any) -> list[str]:
    """The fixed prompt set: captions of world clips `seed + i` (the evaluate CLI's prompts)."""
    from pipeline.evaluate import world_clips

    fc, mc = cfg.train.fidelity, cfg.build_model_config(True)
    seconds = fc.seconds or cfg.data.seconds
    return [c.meta["caption"] for c in world_clips(fc.clips, seconds, fc.seed, mc.height, mc.width)]


def figures(bundle: Any, cfg: Any) -> dict[str, float]:
    """Generate the fixed set with `bundle` (causal: streamed; bidirectional: the teacher's own
    sampler at `distill.teacher_steps`) and score it: {figure: value}, NaN where undefined."""
    import torch

    from pipeline.evaluate import evaluate, generate

    fc = cfg.train.fidelity
    seconds = fc.seconds or cfg.data.seconds
    with torch.no_grad():  # seeded generators only: the training RNG streams are untouched
        clips = generate(bundle, prompts(cfg), seconds, fc.seed, cfg.distill.teacher_steps)
    report = evaluate(clips)
    return {name: float(report.get(key, math.nan)) for name, (key, _) in FIGURES.items()}


def better(value: float, best: float | None, higher: bool) -> bool:
    """Whether `value` beats `best` (None: nothing yet); NaN never does, ties keep the earlier."""
    if math.isnan(value):
        return False
    return best is None or (value > best if higher else value < best)


class Watcher:
    """Evaluates the stage's student every `train.fidelity.every` steps (see the module)."""

    def __init__(self, stage: Any, ctx: WorkerContext, logger: Any) -> None:
        self.stage, self.ctx, self.logger = stage, ctx, logger
        self.fc = ctx.cfg.train.fidelity
        self.enabled = self.fc.every > 0 and hasattr(stage, "export")
        self.best: float | None = None
        self.teacher: dict[str, float] | None = None
        self._teacher_unlogged = False
        if self.enabled and logger is not None:
            self._start()

    def _start(self) -> None:
        """Rank 0: the best so far and the teacher reference from the run (a resume), else the
        teacher's figures now, at the start."""
        tags = _run_tags(self.logger)
        if tags.get(BEST_VALUE_TAG) and tags.get(BEST_METRIC_TAG) == PREFIX + self.fc.best_by:
            self.best = float(tags[BEST_VALUE_TAG])
        if TEACHER_TAG in tags:
            self.teacher = json.loads(tags[TEACHER_TAG])
            return
        teacher = getattr(self.stage, "teacher", None)
        if not self.fc.teacher or teacher is None:
            return
        t0 = time.perf_counter()
        self.teacher = figures(_usable_teacher(teacher, self.ctx), self.ctx.cfg)
        log.info("teacher fidelity %s (%.1f s)", self.teacher, time.perf_counter() - t0)
        _set_tags(self.logger, {TEACHER_TAG: json.dumps(self.teacher)})
        self._teacher_unlogged = True

    def start(self, step: int) -> None:
        """Before the loop (collective, like a call): on a fresh start (`step` 0) with
        `train.fidelity.at_start`, evaluate the starting weights as step 0, so they compete
        for the best step with every later one."""
        if step == 0 and self.fc.at_start:
            self(0)

    def __call__(self, step: int) -> None:
        """Collective at an evaluation step (every rank calls it after every step)."""
        if not self.enabled or step % self.fc.every:
            return
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "bundle"
            self.stage.export(out if self.logger is not None else None, self.ctx)
            if self.logger is not None:
                self._evaluate(step, out)

    def _evaluate(self, step: int, exported: Path) -> None:
        from model.bundle import Bundle

        t0 = time.perf_counter()
        bundle = Bundle.from_pretrained(exported, device=self.ctx.device, dtype=self.ctx.dtype)
        figs = figures(bundle, self.ctx.cfg)
        del bundle
        metrics = {PREFIX + k: v for k, v in figs.items() if not math.isnan(v)}
        metrics[PREFIX + "eval_s"] = time.perf_counter() - t0
        if self._teacher_unlogged and self.teacher:
            metrics |= {TEACHER_PREFIX + k: v for k, v in self.teacher.items() if v == v}
            self._teacher_unlogged = False
        # Logged before the step's losses and without "loss": the restart de-duplication keys
        # on "loss", so this batch never hides the step's losses nor they it.
        _log_metrics(self.logger, step, metrics)
        value, higher = figs[self.fc.best_by], FIGURES[self.fc.best_by][1]
        if better(value, self.best, bool(higher)):
            self.best = value
            path = f"best/step-{step:08d}"
            _log_artifacts(self.logger, exported, path)  # before the tags that name it
            _set_tags(
                self.logger,
                {
                    BEST_STEP_TAG: step,
                    BEST_VALUE_TAG: value,
                    BEST_METRIC_TAG: PREFIX + self.fc.best_by,
                    BEST_EXPORT_TAG: path,
                },
            )
        self._plot()

    def _plot(self) -> None:
        from pipeline.plots import fidelity_curve

        keys = [PREFIX + k for k, (_, higher) in FIGURES.items() if higher is not None]
        history = self.logger.history(keys)
        refs = {PREFIX + k: v for k, v in (self.teacher or {}).items()}
        with tempfile.TemporaryDirectory() as d:
            fidelity_curve(history, refs, Path(d) / "fidelity.png", title=self.stage.name)
            _log_artifacts(self.logger, d, "plots")


def _usable_teacher(teacher: Any, ctx: WorkerContext) -> Any:
    """The stage's teacher Bundle, or a fresh load of it where the stage dropped its DiT to the
    meta device (`distill.real_score: actors`)."""
    if next(teacher.model.parameters()).device.type != "meta":
        return teacher
    from pipeline.distill.roles import load_teacher

    return load_teacher(ctx.cfg.distill.teacher, ctx.device, ctx.dtype)


# The rank-0 logger is `pipeline.outbox.TrackingOutbox` (log_metrics / set_tags / log_artifacts)
# or the older `pipeline.tracking.MetricLogger` (log / client); both have client, run_id, history.
def _log_metrics(logger: Any, step: int, metrics: dict[str, float]) -> None:
    if hasattr(logger, "log_metrics"):
        logger.log_metrics(step, metrics)
    else:
        logger.log(step, metrics)


def _set_tags(logger: Any, tags: dict[str, Any]) -> None:
    if hasattr(logger, "set_tags"):
        logger.set_tags(tags)
    else:
        from pipeline import tracking

        tracking.set_tags(logger.client, logger.run_id, {k: str(v) for k, v in tags.items()})


def _log_artifacts(logger: Any, folder: str | Path, artifact_path: str) -> None:
    if hasattr(logger, "log_artifacts"):
        logger.log_artifacts(folder, artifact_path)
    else:
        logger.client.log_artifacts(logger.run_id, str(folder), artifact_path)


def _run_tags(logger: Any) -> dict[str, str]:
    """The run's tags, {} when the tracking server does not answer (a fresh start then)."""
    try:
        return dict(logger.client.get_run(logger.run_id).data.tags)
    except Exception as err:  # noqa: BLE001 — MlflowException / connection errors
        log.warning("fidelity: cannot read run %s's tags (%s)", logger.run_id, err)
        return {}
