"""Stage `ode`: causal ODE regression, the student's initialisation (CausVid style).

Per sample and per block an independent point of the teacher's trajectory (the clean end
included) is drawn; every latent of that block, video and audio, gets that state and its σ. One
full-sequence block-causal forward of the student predicts x0; the loss is the MSE to the
teacher's clean x0 per modality, masked to σ > 0, weighted by `distill.ode_weight_*`.

Trajectories come from the rows (`traj_video`, `traj_audio`, `traj_sigmas`, written by the
teacher-scoring actor pool) or, with `distill.teacher_mode: local`, from the frozen teacher in
this worker (memoised per clip key). The student = teacher weights + fresh audio sinks. It does
not run the loop or checkpoint (pipeline.worker_loop).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import BlockLayout, flow
from pipeline.distill import dmd, roles, sharded
from pipeline.distill.trajectories import row_seed, teacher_trajectory
from pipeline.parallelize import Ema, make_engine
from pipeline.stages import Batch, WorkerContext


def block_points(
    traj_v: torch.Tensor,
    traj_a: torch.Tensor,
    sigmas: torch.Tensor,
    g: torch.Generator,
    clean_context: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random trajectory point per (sample, block), shared by both modalities of the block.

    `clean_context`: the share of samples in which one random block k sees clean context, as
    the streaming student does (it attends to committed x0 of the blocks before): blocks < k
    get the trajectory's clean end (σ 0: no loss there), blocks ≥ k random points as usual.

    traj_v [B, K+1, Fv, h, w, C], traj_a [B, K+1, Fa, C], sigmas [K+1] →
    (x_v [B,Fv,h,w,C], x_a [B,Fa,C], σ_v [B,Fv], σ_a [B,Fa]).
    """
    b, n_pts, fv = traj_v.shape[:3]
    layout = BlockLayout.from_counts(fv, traj_a.shape[2])
    idx = torch.randint(0, n_pts, (b, layout.num_blocks), generator=g)  # [B, blocks]
    if clean_context > 0:
        k = torch.randint(0, layout.num_blocks, (b, 1), generator=g)
        pick = torch.rand(b, 1, generator=g) < clean_context
        before = torch.arange(layout.num_blocks)[None] < k  # [B, blocks]
        idx = torch.where(pick & before, n_pts - 1, idx)  # the clean end (σ 0)
    iv = idx[:, layout.video_block_ids()].to(traj_v.device)  # [B, Fv]
    ia = idx[:, layout.audio_block_ids()].to(traj_a.device)  # [B, Fa]
    xv = torch.gather(traj_v, 1, iv.view(b, 1, fv, 1, 1, 1).expand(-1, 1, -1, *traj_v.shape[3:]))
    xa = torch.gather(traj_a, 1, ia.view(b, 1, -1, 1).expand(-1, 1, -1, traj_a.shape[3]))
    sig = sigmas.to(traj_v.device, torch.float32)
    return xv[:, 0], xa[:, 0], sig[iv], sig[ia]


class OdeStage:
    name = "ode"
    plot_keys = ["loss", "loss/video", "loss/audio"]

    @staticmethod
    def prepare_dataset(ds: Any, cfg: Any) -> Any:
        """Driver-side hook: with `teacher_mode: actors`, rows are scored by the teacher actor
        pool (streamed, or via cached trajectory shards when `distill.trajectory_cache`)."""
        if cfg.distill.teacher_mode != "actors":
            return ds
        from pipeline.distill.trajectory_shards import cached_trajectories

        return cached_trajectories(ds, cfg)

    def setup(self, ctx: WorkerContext) -> None:
        cfg, d = ctx.cfg, ctx.cfg.distill
        # Read straight onto the device in the compute dtype (no fp32 host copy of the DiT).
        self.teacher = roles.load_teacher(d.teacher, ctx.device, ctx.dtype)
        if cfg.train.zero_stage == 3:  # partitioned as it is built (pipeline.distill.sharded)
            net = sharded.build_role("student", d.student, self.teacher.model, cfg, ctx.dtype)
        else:
            net = roles.build_role("student", d.student, self.teacher.model, cfg).to(ctx.device)
        if d.teacher_mode == "actors":  # trajectories come from the actors: drop the DiT
            self.teacher.model.to("meta")
            if self.teacher.guide is not None:
                self.teacher.guide.model.to("meta")
        self.engine = make_engine(net, cfg)
        ema = cfg.train.ema
        self._emas = (
            {"student": Ema(self.engine.module, ema.decay, ema.offload)} if ema.enabled else {}
        )
        self._traj: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def engines(self) -> dict[str, Any]:
        return {"student": self.engine}

    def emas(self) -> dict[str, Any]:
        return self._emas

    def trajectories(self, batch: Batch, ctx: WorkerContext):
        """(traj_v, traj_a, σ [K+1]) from the rows, or from the local teacher (memoised)."""
        if "traj_video" in batch:
            tv = torch.as_tensor(np.ascontiguousarray(batch["traj_video"]), dtype=torch.float32)
            ta = torch.as_tensor(np.ascontiguousarray(batch["traj_audio"]), dtype=torch.float32)
            sig = torch.as_tensor(np.asarray(batch["traj_sigmas"])[0], dtype=torch.float32)
            return tv.to(ctx.device, ctx.dtype), ta.to(ctx.device, ctx.dtype), sig
        d = ctx.cfg.distill
        if d.teacher_mode == "actors":
            raise ValueError(
                "distill.teacher_mode=actors but the batch has no traj_video/traj_audio "
                "columns: the dataset was not scored by the teacher actor pool"
            )
        video, audio, captions, keys = roles.batch_latents(batch, ctx.device, ctx.dtype)
        todo = [i for i, k in enumerate(keys) if k not in self._traj]
        if todo:
            tv, ta, sig = teacher_trajectory(
                self.teacher.model,
                self.teacher.text_encoder,
                [captions[i] for i in todo],
                [row_seed(keys[i], ctx.cfg.train.seed) for i in todo],
                (tuple(video.shape[1:]), tuple(audio.shape[1:])),
                d.student_sigmas,
                d.teacher_steps,
                (d.ode_cfg_video, d.ode_cfg_audio),
                self.teacher.guide,
                self.teacher.stagger,
            )
            for j, i in enumerate(todo):  # fp32 ODE states → the student's compute dtype
                self._traj[keys[i]] = (tv[j].to(ctx.dtype), ta[j].to(ctx.dtype), sig)
        rows = [self._traj[k] for k in keys]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), rows[0][2]

    def losses(
        self, net: Any, batch: Batch, g: torch.Generator, ctx: WorkerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(video loss, audio loss) of `net` (the engine, or a bare student in unit tests) on one
        batch at random trajectory points."""
        tv, ta, sig = self.trajectories(batch, ctx)
        xv, xa, sv, sa = block_points(tv, ta, sig, g, ctx.cfg.distill.ode_clean_context)
        with torch.no_grad():
            emb, mask = self.teacher.text_encoder([str(c) for c in batch["caption"]])
        vel_v, vel_a = net(xv, xa, sv.to(ctx.dtype), sa.to(ctx.dtype), emb.to(ctx.dtype), mask)
        x0v = flow.x0_from_velocity(xv, vel_v, sv)
        x0a = flow.x0_from_velocity(xa, vel_a, sa)
        return dmd.ode_loss(x0v, tv[:, -1], sv), dmd.ode_loss(x0a, ta[:, -1], sa)

    def train_step(
        self, step: int, next_batch: Callable[[], Batch], ctx: WorkerContext
    ) -> dict[str, float]:
        t, d = ctx.cfg.train, ctx.cfg.distill
        sums = {"loss/video": 0.0, "loss/audio": 0.0}
        self.engine.train()
        for micro in range(t.grad_accum):
            lv, la = self.losses(self.engine, next_batch(), ctx.generator(step, micro), ctx)
            self.engine.backward(d.ode_weight_video * lv + d.ode_weight_audio * la)
            self.engine.step()
            sums["loss/video"] += lv.item() / t.grad_accum
            sums["loss/audio"] += la.item() / t.grad_accum
        for ema in self._emas.values():
            ema.update(self.engine.module, step)
        out = {**sums, "loss": d.ode_weight_video * sums["loss/video"]}
        out["loss"] += d.ode_weight_audio * sums["loss/audio"]
        out["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["lr"] = float(self.engine.get_lr()[0])
        return out

    def artifacts(self, step: int, out_dir: Path | None, ctx: WorkerContext) -> None:
        """A contact sheet of one streamed student clip (the trainer's periodic hook)."""
        g = ctx.generator(step, 0, purpose=3)
        roles.student_sheet(
            self.engine.module,
            self.teacher,
            list(ctx.cfg.distill.student_sigmas),
            ctx.cfg.data.seconds,
            g,
            out_dir,
        )

    def export(self, out_dir: Path | None, ctx: WorkerContext) -> None:
        """The causal student (EMA weights if enabled) as a Bundle `promote` can register."""
        roles.export_stage_student(self, out_dir, ctx)


STAGE = OdeStage
