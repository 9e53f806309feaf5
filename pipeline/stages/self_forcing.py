"""Stage `self-forcing`: Joint Self-Forcing DMD with a trainable critic (TTUR).

Generator update: the causal student rolls the whole clip out with its own KV cache
(`pipeline.distill.rollout`: serving's `rollout_blocks` loop), both modalities jointly, one
random exit step per rollout shared by all blocks (earlier steps without gradient, clean σ = 0
commit detached). DMD per modality at one σ for both modalities (t ~ U{20..980}): real x0 from the
frozen teacher with CFG (separate scales), fake x0 from the critic; g = (fake − real)/mean|x̂ −
real|; loss 0.5‖x̂ − sg(x̂ − g)‖², weighted per modality. `distill.loss_scope: last_block` noises
and supervises only the last block (earlier frames σ = 0); `distill.prefix: clean_from_teacher`
pins block 0 to the clip's clean latents. Critic: flow matching on detached student samples,
`critic_updates_per_generator` updates per generator update, its own engine. Logs per-modality
gradient norms (DMD gradient at the outputs; audio- vs video-stream parameter gradients).
The real score runs on this worker's frozen teacher (`distill.real_score: local`) or, with
`actors`, on a pool of named teacher actors the driver starts for the run (`driver_resources`,
pipeline.distill.real_score): the worker then sends x_t and gets the CFG x0 back, and drops its
teacher DiT after initialising the student and critic (it keeps the teacher's text encoder and
codecs). `teacher_mode` only affects `ode`. It does not run the loop or checkpoint
(pipeline.worker_loop).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from model import AVDiT, flow
from model.guidance import bind
from pipeline.distill import dmd, roles, sharded
from pipeline.distill.rollout import noise_levels, rollout
from pipeline.distill.trajectories import guided_x0
from pipeline.parallelize import Ema, make_engine
from pipeline.stages import Batch, WorkerContext


def grad_norms(named: list[tuple[str, torch.nn.Parameter]], deepspeed: bool) -> dict[str, float]:
    """‖∇‖ of the audio-stream and video-stream parameters (after backward, before step)."""
    sq = {"video": 0.0, "audio": 0.0}
    for name, p in named:
        if deepspeed:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(p)
        else:
            grad = p.grad
        stream = roles.stream_of(name)
        if grad is not None and stream in sq:
            sq[stream] += float(grad.float().pow(2).sum())
    return {f"grad/param_{k}": v**0.5 for k, v in sq.items()}


class SelfForcingStage:
    name = "self-forcing"
    plot_keys = ["loss/dmd_video", "loss/dmd_audio", "loss/critic"]

    @staticmethod
    def driver_resources(cfg: Any) -> AbstractContextManager[dict[str, Any]]:
        """Driver-side hook (pipeline.trainer.run_stage): with `distill.real_score: actors`, the
        teacher actor pool, alive around fit(); yields what workers get in `WorkerContext.extra`."""
        if cfg.distill.real_score != "actors":
            return nullcontext({})
        from pipeline.distill.real_score import real_score_pool

        return real_score_pool(cfg)

    def setup(self, ctx: WorkerContext) -> None:
        def make(net: AVDiT, lr: float | None = None, updates_per_step: int = 1) -> Any:
            # A ZeRO-3 network is already partitioned on its device (sharded.build_role).
            net = net if sharded.is_partitioned(net) else net.to(ctx.device)
            return make_engine(net, ctx.cfg, lr, updates_per_step)

        self.build(ctx, make, zero3=ctx.cfg.train.zero_stage == 3)

    def build(self, ctx: WorkerContext, make: Callable[..., Any], zero3: bool = False) -> None:
        """Networks from the `distill` role entries; `make(net, lr, updates_per_step)` wraps one
        in an engine (the critic steps `critic_updates_per_generator` times per training step:
        its LR schedule runs on training steps, else its cosine would end at a fifth of the run).

        The teacher's DiT is read straight onto this worker's device in the compute dtype (never
        a full fp32 copy on the host). `zero3`: the student and critic are built partitioned
        (`sharded.build_role`: zero.Init, each rank fills only its slice from the teacher)."""
        cfg, d = ctx.cfg, ctx.cfg.distill
        local = d.real_score == "local"
        self.teacher = roles.load_teacher(d.teacher, ctx.device, ctx.dtype)
        self.sigmas = [float(s) for s in d.student_sigmas]
        self.scales = (d.cfg_video, d.cfg_audio)
        t = self.teacher.model
        if zero3:
            student = sharded.build_role("student", d.student, t, cfg, ctx.dtype)
            critic = sharded.build_role("critic", d.critic, t, cfg, ctx.dtype)
        else:
            student = roles.build_role("student", d.student, t, cfg)
            critic = roles.build_role("critic", d.critic, t, cfg)
        self.real: AVDiT | None = None
        self._remote: Any = None
        if local:
            self.real = roles.build_role("teacher", None, t, cfg)
        else:
            from pipeline.distill.real_score import RealScoreClient

            self._remote = RealScoreClient(ctx.extra, ctx.rank)
            # The actor scores; keep only the teacher's text encoder and codecs (the DiT's
            # weights go to the meta device before the engines allocate their optimizer state).
            self.teacher.model.to("meta")
            if self.teacher.guide is not None:
                self.teacher.guide.model.to("meta")
        self.engine = make(student)
        self.critic = make(critic, d.critic_lr, d.critic_updates_per_generator)
        ema = cfg.train.ema
        self._emas = (
            {"student": Ema(self.engine.module, ema.decay, ema.offload)} if ema.enabled else {}
        )
        self.deepspeed = not hasattr(self.engine, "plain")

    def engines(self) -> dict[str, Any]:
        return {"student": self.engine, "critic": self.critic}

    def emas(self) -> dict[str, Any]:
        return self._emas

    # ---- one batch's inputs ---------------------------------------------------------------------
    def inputs(self, batch: Batch, ctx: WorkerContext) -> dict[str, Any]:
        video, audio, captions, _ = roles.batch_latents(batch, ctx.device, ctx.dtype)
        with torch.no_grad():
            emb, mask = self.teacher.text_encoder(captions)  # the frozen teacher's encoder
            text = (emb.to(ctx.dtype), mask)
            emb0, mask0 = self.teacher.text_encoder([""])
            null = (emb0.to(ctx.dtype), mask0)
        # The local real score's autoguidance, prompts encoded once per batch like `text`
        # (actors bind their own guide).
        bound = bind(self.teacher.guide if self._remote is None else None, captions)
        fv, fa = video.shape[1], audio.shape[1]
        seconds = (fv - 1) // self.engine.module.cfg.video_block_latents
        prefix = (video[:, :1], audio[:, :1]) if ctx.cfg.distill.prefix != "generated" else None
        cfgm = self.engine.module.cfg
        last = (
            1 + cfgm.video_block_latents * (seconds - 1),
            1 + cfgm.audio_block_latents * (seconds - 1),
        )
        return {
            "captions": captions, "text": text, "null": null, "guide": bound, "seconds": seconds,
            "prefix": prefix, "fv": fv, "fa": fa,
            "last": last if ctx.cfg.distill.loss_scope == "last_block" else None,
            "n_tokens": fv * cfgm.video_tokens_per_frame + fa,
        }  # fmt: skip

    def _sample(self, inp: dict[str, Any], g: torch.Generator, exit_step: int):
        return rollout(
            self.engine.module, inp["text"], inp["seconds"], self.sigmas, g,
            exit_step, inp["prefix"],
        )  # fmt: skip

    def _noised(self, xv, xa, inp: dict[str, Any], g: torch.Generator, ctx: WorkerContext):
        d = ctx.cfg.distill
        sig = dmd.sample_sigma(xv.shape[0], g, inp["n_tokens"], d.min_timestep, d.max_timestep)
        sv, sa = noise_levels(sig.to(ctx.device), inp["fv"], inp["fa"], inp["last"])
        nv = flow.randn(xv.shape, g, xv.device, xv.dtype)
        na = flow.randn(xa.shape, g, xa.device, xa.dtype)
        return flow.add_noise(xv, nv, sv), flow.add_noise(xa, na, sa), sv, sa, nv, na

    def real_score(self, xtv, xta, sv, sa, inp: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The teacher's CFG x0 (video [B,Fv,h,w,C], audio [B,Fa,C]) at x_t and σ [B,Fv], [B,Fa]:
        on this worker's frozen teacher, or on its actor of the pool (`distill.real_score`)."""
        if self._remote is not None:
            return self._remote(xtv, xta, sv, sa, inp["captions"], self.scales)
        return guided_x0(
            self.real, xtv, xta, sv, sa, inp["text"], inp["null"], self.scales, inp["guide"]
        )

    # ---- updates --------------------------------------------------------------------------------
    def critic_update(
        self, inp: dict[str, Any], g: torch.Generator, ctx: WorkerContext, exit_step: int = -1
    ) -> float:
        """One flow-matching step of the critic on a detached student sample (its exit step
        drawn from `g` unless given)."""
        k = len(ctx.cfg.distill.student_sigmas)
        if exit_step < 0:
            exit_step = int(torch.randint(0, k, (1,), generator=g))
        with torch.no_grad():
            xv, xa = self._sample(inp, g, exit_step)
        xtv, xta, sv, sa, nv, na = self._noised(xv, xa, inp, g, ctx)
        vel_v, vel_a = self.critic(xtv, xta, sv.to(ctx.dtype), sa.to(ctx.dtype), *inp["text"])
        x0v, x0a = flow.x0_from_velocity(xtv, vel_v, sv), flow.x0_from_velocity(xta, vel_a, sa)
        loss = dmd.critic_loss(x0v, xtv, nv, xv, sv) + dmd.critic_loss(x0a, xta, na, xa, sa)
        self.critic.backward(loss)
        self.critic.step()
        return float(loss.detach())

    def generator_update(
        self,
        inp: dict[str, Any],
        g: torch.Generator,
        exit_step: int,
        ctx: WorkerContext,
        norms: bool = True,
    ) -> dict[str, float]:
        """One DMD step of the student; returns losses and per-modality gradient norms."""
        d = ctx.cfg.distill
        xv, xa = self._sample(inp, g, exit_step)  # gradient through each block's exit step
        xtv, xta, sv, sa, _, _ = self._noised(xv.detach(), xa.detach(), inp, g, ctx)
        with torch.no_grad():
            rv, ra = self.real_score(xtv, xta, sv, sa, inp)
            fvel_v, fvel_a = self.critic.module(xtv, xta, sv, sa, *inp["text"])
            fv, fa = flow.x0_from_velocity(xtv, fvel_v, sv), flow.x0_from_velocity(xta, fvel_a, sa)
        v0, a0 = inp["last"] or (0, 0)  # supervised frames: the last block or the whole clip
        lv, gv = dmd.dmd_loss(xv[:, v0:], rv[:, v0:], fv[:, v0:])
        la, ga = dmd.dmd_loss(xa[:, a0:], ra[:, a0:], fa[:, a0:])
        self.engine.backward(d.dmd_weight_video * lv + d.dmd_weight_audio * la)
        out = {"loss/dmd_video": float(lv.detach()), "loss/dmd_audio": float(la.detach())}
        # ∂loss/∂x̂_m = w_m · g_m / numel_m: the DMD gradient that reaches each output.
        out["grad/out_video"] = d.dmd_weight_video * float(gv.float().norm()) / gv.numel()
        out["grad/out_audio"] = d.dmd_weight_audio * float(ga.float().norm()) / ga.numel()
        if norms:  # collective under ZeRO (every rank gathers the same grads)
            out |= grad_norms(list(self.engine.module.named_parameters()), self.deepspeed)
        self.engine.step()
        return out

    def train_step(
        self, step: int, next_batch: Callable[[], Batch], ctx: WorkerContext
    ) -> dict[str, float]:
        d = ctx.cfg.distill
        inp = self.inputs(next_batch(), ctx)
        self.engine.train()
        self.critic.train()
        n, k = d.critic_updates_per_generator, len(d.student_sigmas)
        exits = [-1] * n  # each rank draws its own (below ZeRO-3)
        if ctx.cfg.train.zero_stage == 3:  # every forward is collective: same calls on all ranks
            gs = torch.Generator().manual_seed(ctx.cfg.train.seed * 1_000_003 + step + 500_009)
            exits = torch.randint(0, k, (n,), generator=gs).tolist()
        critic = [
            self.critic_update(inp, ctx.generator(step, i, purpose=1), ctx, exits[i])
            for i in range(n)
        ]
        # One exit step per rollout, the same on every rank (no rank in the seed).
        ge = torch.Generator().manual_seed(ctx.cfg.train.seed * 1_000_003 + step)
        exit_step = int(torch.randint(0, len(d.student_sigmas), (1,), generator=ge))
        norms = bool(d.grad_norm_every) and step % d.grad_norm_every == 0
        out = self.generator_update(inp, ctx.generator(step, 0, purpose=2), exit_step, ctx, norms)
        for ema in self._emas.values():
            ema.update(self.engine.module, step)
        out["loss/critic"] = sum(critic) / len(critic)
        out["loss"] = d.dmd_weight_video * out["loss/dmd_video"]
        out["loss"] += d.dmd_weight_audio * out["loss/dmd_audio"]
        out["exit_step"] = float(exit_step)
        out["lr"] = float(self.engine.get_lr()[0])
        return out

    def artifacts(self, step: int, out_dir: Path | None, ctx: WorkerContext) -> None:
        """A contact sheet of one streamed student clip (the trainer's periodic hook)."""
        g = ctx.generator(step, 0, purpose=3)
        roles.student_sheet(
            self.engine.module, self.teacher, list(self.sigmas), ctx.cfg.data.seconds, g, out_dir
        )

    def export(self, out_dir: Path | None, ctx: WorkerContext) -> None:
        """The causal student (EMA weights if enabled) as a Bundle `promote` can register."""
        roles.export_stage_student(self, out_dir, ctx)


STAGE = SelfForcingStage
