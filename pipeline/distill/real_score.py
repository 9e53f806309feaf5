"""The DMD real score served by a pool of named Ray actors (`distill.real_score: actors`).

- `RealScoreActor`: holds the frozen teacher Bundle (loaded once); `x0(xv, xa, sv, sa, captions,
  scales)` returns the teacher's CFG x0 via `trajectories.guided_x0`, with text from the
  teacher's own encoder and "" as the null caption. numpy float32 in and out (never pickled
  torch modules); with `distill.actor_gpus` > 0 its DiT runs on its GPU in bf16 (CFG and x0 in
  fp32), else all in fp32 on CPU with one intra-op thread (`roles.actor_placement`).
- `real_score_pool(cfg)`: driver side. Starts `distill.actors` actors with unique names, waits
  until each has its teacher, yields what the workers need to find them (`WorkerContext.extra`)
  and kills them when the block exits, failure included.
- `RealScoreClient`: worker side. Looks its actor up by name (`rank % N`) and calls it.
It trains nothing and holds no loss (pipeline.stages.self_forcing does).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from model.guidance import bind
from pipeline.distill.trajectories import guided_x0

NAMES_KEY = "real_score_actors"  # WorkerContext.extra keys the pool fills
NAMESPACE_KEY = "real_score_namespace"
# Loading the teacher (a models:/ download for big ones) may take minutes; a pool that cannot be
# scheduled at all (too few CPUs) must fail rather than hang the driver.
READY_TIMEOUT_S = 600.0


def _tensor(x: np.ndarray) -> torch.Tensor:
    # A copy: Ray hands read-only arrays out of its object store.
    return torch.tensor(np.asarray(x, dtype=np.float32))


class RealScoreActor:
    """Ray actor body (a plain class, so it also runs in-process): the frozen teacher's x0."""

    def __init__(self, teacher: str, gpus: float = 0.0) -> None:
        from pipeline.distill.roles import load_actor_teacher

        self.bundle = load_actor_teacher(teacher, gpus)  # frozen; device/dtype from `gpus`
        p = next(self.bundle.model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def x0(
        self,
        xv: np.ndarray,
        xa: np.ndarray,
        sv: np.ndarray,
        sa: np.ndarray,
        captions: Sequence[str],
        scales: Sequence[float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """x_t video [B,Fv,h,w,C], audio [B,Fa,C], σ [B,Fv], [B,Fa] → CFG x0 (same shapes)."""
        enc = self.bundle.text_encoder
        prompts = [str(c) for c in captions]
        text, null = enc(prompts), enc([""])
        guide = bind(self.bundle.guide, prompts)
        dev = self.device
        # Latents and σ stay fp32: guided_x0 runs only the DiT in the teacher's dtype (bf16 on a
        # GPU actor) and forms CFG and x0 in fp32, so the reply carries no bf16 x_t rounding.
        x0v, x0a = guided_x0(
            self.bundle.model, _tensor(xv).to(dev), _tensor(xa).to(dev),
            _tensor(sv).to(dev), _tensor(sa).to(dev),
            text, null, (float(scales[0]), float(scales[1])), guide,
        )  # fmt: skip
        return x0v.float().cpu().numpy(), x0a.float().cpu().numpy()


@contextmanager
def real_score_pool(cfg: Any) -> Iterator[dict[str, Any]]:
    """Driver: `distill.actors` named teacher actors for one run, alive for the whole block.

    Yields {NAMES_KEY: [name, ...], NAMESPACE_KEY: namespace} for `WorkerContext.extra`. The
    actors are owned by this driver (not detached), so they also die with it.
    """
    import ray

    d = cfg.distill
    namespace = ray.get_runtime_context().namespace
    run = uuid.uuid4().hex[:8]  # unique per launch: two runs on one cluster never share a pool
    names = [f"real-score-{run}-{i}" for i in range(d.actors)]
    remote = ray.remote(RealScoreActor)
    actors = []
    try:
        for name in names:
            opts = dict(name=name, namespace=namespace, num_cpus=d.actor_cpus)
            opts |= dict(num_gpus=d.actor_gpus)
            # x0 is a pure function of its inputs, so a restarted actor may safely redo a call.
            opts |= dict(max_restarts=2, max_task_retries=2)
            actors.append(remote.options(**opts).remote(d.teacher, d.actor_gpus))
        _wait_ready(actors, d)
        yield {NAMES_KEY: names, NAMESPACE_KEY: namespace}
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _wait_ready(actors: list[Any], d: Any) -> None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
    except GetTimeoutError:
        raise RuntimeError(
            f"distill.real_score=actors: {d.actors} actor(s) (distill.actors) with "
            f"distill.actor_cpus={d.actor_cpus} and distill.actor_gpus={d.actor_gpus} each did "
            f"not start within {READY_TIMEOUT_S:.0f} s (too few CPUs/GPUs in the cluster, or a "
            "slow teacher download?)"
        ) from None
    except RayActorError as err:
        raise RuntimeError(
            f"distill.real_score=actors: a teacher actor failed to start "
            f"(distill.teacher={d.teacher!r}): {err}"
        ) from None


class RealScoreClient:
    """Worker side: the pool's actor for this rank (`rank % N`), called with tensors."""

    def __init__(self, extra: dict[str, Any], rank: int) -> None:
        import ray

        names = extra.get(NAMES_KEY)
        if not names:
            raise ValueError(
                "distill.real_score=actors but the worker got no actor names: the driver starts "
                "the pool (SelfForcingStage.driver_resources via pipeline.trainer.run_stage)"
            )
        self.name = names[rank % len(names)]
        try:
            self.actor = ray.get_actor(self.name, namespace=extra.get(NAMESPACE_KEY))
        except ValueError:
            raise ValueError(
                f"distill.real_score=actors: actor {self.name!r} not found (pool already gone?)"
            ) from None

    def __call__(
        self,
        xv: torch.Tensor,
        xa: torch.Tensor,
        sv: torch.Tensor,
        sa: torch.Tensor,
        captions: Sequence[str],
        scales: tuple[float, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG x0 of the teacher for x_t (any device/dtype); returned on xv's device and dtype."""
        import ray

        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().float().cpu().numpy()

        ref = self.actor.x0.remote(arr(xv), arr(xa), arr(sv), arr(sa), list(captions), scales)
        x0v, x0a = ray.get(ref)
        return _tensor(x0v).to(xv.device, xv.dtype), _tensor(x0a).to(xa.device, xa.dtype)
