"""Teacher ODE trajectories and the Ray teacher-scoring actor pool.

- `teacher_trajectory`: the frozen bidirectional teacher's Euler sampler (LTX-2 schedule, CFG per
  modality) run *through* the student's σ points, recording the state at each of them plus the
  clean end: video [B, K+1, Fv, h, w, C], audio [B, K+1, Fa, C], σ [K+1] (last = 0).
- `guided_x0`: the teacher's CFG x0 at per-frame σ (the DMD real score uses it too).
- `TeacherScorer` + `score_dataset`: `map_batches` over an `ActorPoolStrategy` pool holding the
  teacher (`distill.actor_gpus` each: DiT on GPU in bf16, or CPU fp32 when 0; the ODE state
  is fp32 either way); rows gain `traj_video`, `traj_audio`, `traj_sigmas` (streamed into the
  trainers).
Trajectory shards (the on-disk cache of these rows) live in trajectory_shards.py. No training and
no losses live here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model import AVDiT, flow
from model.guidance import BoundGuide, Guide, bind, teacher_velocity
from model.sampling import frame_velocity


def guided_x0(
    model: AVDiT,
    xv: torch.Tensor,
    xa: torch.Tensor,
    sv: torch.Tensor,
    sa: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    null: tuple[torch.Tensor, torch.Tensor],
    scales: tuple[float, float],
    guide: BoundGuide | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided teacher's x0 at per-frame σ: `model.guidance.teacher_velocity` (CFG, plus
    autoguidance when the teacher bundle ships a guide), then x0 = x_t − σ·v.

    Only the networks run in their own dtype (bf16 on a GPU teacher actor): the latents x_t are
    cast for them and velocities come back in x_t's dtype, so CFG and x0 are computed at x_t's
    precision (fp32 ODE state stays fp32)."""
    gv, ga = teacher_velocity(model, xv, xa, sv, sa, text, null, scales, guide)
    return flow.x0_from_velocity(xv, gv, sv), flow.x0_from_velocity(xa, ga, sa)


def merged_schedule(student: Sequence[float], steps: int, n_tokens: int) -> list[float]:
    """The teacher's Euler σ list with the student's σ points inserted (descending, ends at 0)."""
    pts = set(flow.ltx2_sigmas(steps, n_tokens).tolist()) | {float(s) for s in student} | {0.0}
    out: list[float] = []
    for s in sorted(pts, reverse=True):
        if not out or out[-1] - s > 1e-6:
            out.append(s)
    return out


def row_seed(key: str, seed: int) -> int:
    """A per-clip seed from its key: a row's trajectory does not depend on how rows are batched."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


@torch.no_grad()
def teacher_trajectory(
    model: AVDiT,
    text_encoder: Any,
    captions: Sequence[str],
    seeds: Sequence[int],
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    student_sigmas: Sequence[float],
    steps: int = 40,
    scales: tuple[float, float] = (3.0, 5.0),
    guide: Guide | None = None,
    stagger: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(traj_v [B,K+1,Fv,h,w,C], traj_a [B,K+1,Fa,C], σ [K+1]) at the student's σ + clean end,
    float32 on the model's device.

    A teacher that samples on a staggered schedule (`stagger` Δ > 0, a bundle's `stagger`) has
    no joint-σ states on its path: its clean end is the staggered Euler sample of the noise and
    the states at the student's σ are (1 − σ)·end + σ·noise (the reflow coupling; the student's
    own re-noised inputs at inference are of that form).

    `shapes` = (video [Fv,h,w,C], audio [Fa,C]) of one clip; `seeds` one per caption. The ODE
    state is integrated in fp32 whatever the model's dtype: a bf16 state (8-bit mantissa) would
    round at each of the ~40 Euler steps and the regression targets would carry the sum; only
    the network's inputs are cast to its dtype (`guided_x0`).
    """
    p = next(model.parameters())
    vshape, ashape = shapes
    nv = torch.stack([flow.randn(vshape, torch.Generator().manual_seed(s)) for s in seeds])
    na = torch.stack(
        [flow.randn(ashape, torch.Generator().manual_seed(s + 1)) for s in seeds]
    )  # [B, Fa, C]
    xv, xa = nv.to(p.device, torch.float32), na.to(p.device, torch.float32)
    text = text_encoder(list(captions))
    null = text_encoder([""])
    bound = bind(guide, captions)  # the bundle's autoguidance
    n_tokens = vshape[0] * model.cfg.video_tokens_per_frame + ashape[0]
    if stagger > 0:
        return _reflow_trajectory(
            model, xv, xa, (text, null, scales, bound), student_sigmas, steps, n_tokens, stagger
        )
    sched = merged_schedule(student_sigmas, steps, n_tokens)
    want = [float(s) for s in student_sigmas] + [0.0]
    rec_v: dict[int, torch.Tensor] = {}
    rec_a: dict[int, torch.Tensor] = {}
    b = len(captions)
    for i, s in enumerate(sched):
        for j, w in enumerate(want):
            if abs(w - s) <= 1e-6 and j not in rec_v:
                rec_v[j], rec_a[j] = xv.clone(), xa.clone()
        if i + 1 == len(sched):
            break
        sv = torch.full((b, vshape[0]), s, device=p.device)
        sa = torch.full((b, ashape[0]), s, device=p.device)
        x0v, x0a = guided_x0(model, xv, xa, sv, sa, text, null, scales, bound)
        nxt = sched[i + 1]  # Euler on velocity == interpolate towards the predicted x0
        xv = xv + (nxt - s) * (xv - x0v) / s
        xa = xa + (nxt - s) * (xa - x0a) / s
    traj_v = torch.stack([rec_v[j] for j in range(len(want))], 1)
    traj_a = torch.stack([rec_a[j] for j in range(len(want))], 1)
    return traj_v, traj_a, torch.tensor(want)


def _reflow_trajectory(
    model: AVDiT,
    nv: torch.Tensor,
    na: torch.Tensor,
    cond: tuple,
    student_sigmas: Sequence[float],
    steps: int,
    n_tokens: int,
    stagger: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`teacher_trajectory` for a staggered sampler: noise [B, F, ...] → clean end on
    `flow.staggered_sigmas`, then the straight-line states at the student's σ."""
    table = flow.staggered_table(steps, stagger, n_tokens)
    ev, ea = flow.euler_sample_staggered(frame_velocity(model, *cond), nv, na, table, stagger)
    want = [float(s) for s in student_sigmas] + [0.0]
    traj_v = torch.stack([flow.add_noise(ev, nv, s) for s in want], 1)
    traj_a = torch.stack([flow.add_noise(ea, na, s) for s in want], 1)
    return traj_v, traj_a, torch.tensor(want)


class TeacherScorer:
    """Ray Data actor: holds the frozen teacher; adds its ODE trajectory to each row."""

    def __init__(
        self,
        teacher: str,
        sigmas: Sequence[float],
        steps: int,
        scales: Sequence[float],
        seed: int,
        gpus: float = 0.0,
    ) -> None:
        from pipeline.distill.roles import load_actor_teacher

        self.bundle = load_actor_teacher(teacher, gpus)  # frozen; device/dtype from `gpus`
        self.sigmas, self.steps = list(sigmas), steps
        self.scales, self.seed = (float(scales[0]), float(scales[1])), seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = [str(k) for k in batch["key"]]
        video, audio = np.asarray(batch["video"]), np.asarray(batch["audio"])
        traj_v, traj_a, sig = teacher_trajectory(
            self.bundle.model,
            self.bundle.text_encoder,
            [str(c) for c in batch["caption"]],
            [row_seed(k, self.seed) for k in keys],
            (tuple(video.shape[1:]), tuple(audio.shape[1:])),
            self.sigmas,
            self.steps,
            self.scales,
            self.bundle.guide,
            self.bundle.stagger,
        )
        out = dict(batch)
        out["traj_video"] = traj_v.float().cpu().numpy()
        out["traj_audio"] = traj_a.float().cpu().numpy()
        out["traj_sigmas"] = np.repeat(sig.numpy()[None], len(keys), 0)
        return out


def score_dataset(ds: Any, cfg: Any) -> Any:
    """`ds` rows {key, caption, video, audio} → the same rows plus the teacher's trajectories."""
    from ray.data import ActorPoolStrategy

    from data.ray_data import configure_context

    d = cfg.distill
    scored = ds.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={
            "teacher": d.teacher,
            "sigmas": list(d.student_sigmas),
            "steps": d.teacher_steps,
            "scales": [d.ode_cfg_video, d.ode_cfg_audio],
            "seed": cfg.train.seed,
            "gpus": d.actor_gpus,
        },
        compute=ActorPoolStrategy(size=d.actors),
        num_cpus=d.actor_cpus,
        num_gpus=d.actor_gpus,
        batch_size=d.actor_batch_size,
        batch_format="numpy",
    )
    # `ds` may have been built under an earlier caller's wait (a dataset copies the context).
    configure_context(cfg.data.actor_start_timeout_s, scored)
    return scored
