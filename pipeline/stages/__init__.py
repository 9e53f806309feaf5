"""Training stages (methods): each owns its networks, its loss and its update cadence.

Holds the `Stage` protocol the method-agnostic loop in `pipeline.worker_loop` drives, the
per-worker `WorkerContext`, and `get_stage(name)`, which imports `pipeline.stages.<name>` (dashes
become underscores) and takes its `STAGE` class. It holds no stage itself; `teacher` lives beside
it and the distillation stages (`ode`, `self_forcing`) plug in the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import JobConfig

STAGE_ORDER = ("teacher", "ode", "self-forcing")


@dataclass
class WorkerContext:
    """What a stage may know about its worker; RNG draws come from `generator`, never globals."""

    cfg: JobConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # compute dtype of engine inputs (bf16 on GPU, fp32 on CPU)
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, step: int, micro: int = 0, purpose: int = 0) -> torch.Generator:
        """A CPU generator keyed by (seed, step, micro-step, purpose, rank): resume-proof draws."""
        key = (self.cfg.train.seed, step, micro, purpose, self.rank)
        seed = 0
        for k in key:
            seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)


Batch = dict[str, Any]  # {"key": [B] str, "caption": [B] str, "video": ndarray, "audio": ndarray}


class Stage(Protocol):
    """A training method. The loop calls these hooks in this order; all but `metrics_keys` are
    collective (every rank calls them the same number of times)."""

    name: str

    def setup(self, ctx: WorkerContext) -> None:
        """Build networks and their DeepSpeed engines (`pipeline.parallelize.make_engine`)."""

    def engines(self) -> dict[str, Any]:
        """Trained engines by name; their state goes into every checkpoint."""

    def emas(self) -> dict[str, Any]:
        """`pipeline.parallelize.Ema` objects by network name (may be empty)."""

    def train_step(
        self, step: int, next_batch: Callable[[], Batch], ctx: WorkerContext
    ) -> dict[str, float]:
        """One optimizer step (pulls as many micro-batches as it needs); returns metrics, which
        must include "loss" (the key MLflow resume de-duplication probes). Draw randomness only
        from `ctx.generator(step, micro, purpose)` so a resumed step repeats exactly."""

    # Optional: `plot_keys: list[str]` (loss-curve series) and
    # `artifacts(step, out_dir | None, ctx)` (sample clip / contact sheet every train.plot_every).
    # Optional driver-side static methods (run once by pipeline.trainer.run_stage, not on
    # workers): `prepare_dataset(ds, cfg) -> ds` and `driver_resources(cfg)`, a context manager
    # kept open around fit() (e.g. an actor pool) whose yielded dict becomes `ctx.extra`.

    def export(self, out_dir: Path | None, ctx: WorkerContext) -> None:
        """Consolidated weights: collective gather; rank 0 gets `out_dir` and writes a Bundle."""


def get_stage(name: str) -> type:
    """The stage class for `teacher`, `ode`, `self-forcing`; a clear error if not available."""
    module_name = f"pipeline.stages.{name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise ValueError(f"stage {name!r} is not available (no module {module_name})") from None
    if not hasattr(module, "STAGE"):
        raise ValueError(f"{module_name} does not define STAGE (the stage class)")
    return module.STAGE


def available_stages() -> list[str]:
    out = []
    for name in STAGE_ORDER:
        try:
            get_stage(name)
        except ValueError:
            continue
        out.append(name)
    return out
