"""Stage `teacher`: flow-matching training of the bidirectional audio+video teacher.

Per sample and per modality an independent σ ~ logit-normal (one σ for all latent frames of that
stream); the network predicts velocity v = ε − x0; loss = MSE(v) per modality, summed. Captions
are dropped to "" with probability `train.text_dropout` (classifier-free guidance). Every
`train.reliance_every` steps it also measures cross-modal reliance: the loss of one stream when the
other stream is shuffled across the batch, minus its paired loss. One DeepSpeed engine trains the
DiT and the word text encoder together. It does not run the loop or checkpoint
(pipeline.worker_loop).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import AVDiT, flow
from pipeline.parallelize import Ema, gather_full, make_engine
from pipeline.stages import Batch, WorkerContext

# The σ curve (`flow.ltx2_sigmas`) staggered training draws are read from: the teacher sampler's
# default 40-step table, of which `flow.staggered_table` samples at coarser steps.
STAGGER_TABLE_STEPS = 40


class TeacherNet(nn.Module):
    """DiT + text encoder as one trainable module (one engine, one optimizer)."""

    def __init__(self, dit: AVDiT, text: nn.Module) -> None:
        super().__init__()
        self.dit, self.text = dit, text

    def forward(self, xv, xa, sigma_v, sigma_a, captions: list[str]):
        emb, mask = self.text(captions)  # [B, L, D], [B, L]
        return self.dit(xv, xa, sigma_v, sigma_a, emb.to(xv.dtype), mask)


def build_text_encoder(cfg: Any, dim: int) -> nn.Module:
    """The embedded word encoder over the synthetic world's caption vocabulary."""
    from model.text import WordTextEncoder, build_vocab

    vocab = ["a", "ball", "red", "green", "blue", "yellow"]
    try:
        from data.world import caption_vocabulary

        vocab = caption_vocabulary()
    except ImportError:  # data package absent: the random source's words suffice
        pass
    return WordTextEncoder(build_vocab([" ".join(vocab), "a red green blue yellow ball"]), dim=dim)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B] mean squared error in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class TeacherStage:
    name = "teacher"
    plot_keys = ["loss", "loss/video", "loss/audio"]

    def setup(self, ctx: WorkerContext) -> None:
        cfg = ctx.cfg
        self.mcfg = cfg.build_model_config(causal=False)
        net = TeacherNet(AVDiT(self.mcfg), build_text_encoder(cfg, self.mcfg.text_dim))
        # `make_engine` in ctx.extra: pipeline.single's plain-torch engine (no DeepSpeed there).
        make = ctx.extra.get("make_engine", make_engine)
        self.engine = make(net.to(ctx.device), cfg)
        ema = cfg.train.ema
        self._emas = (
            {"teacher": Ema(self.engine.module, ema.decay, ema.offload)} if ema.enabled else {}
        )

    def engines(self) -> dict[str, Any]:
        return {"teacher": self.engine}

    def emas(self) -> dict[str, Any]:
        return self._emas

    def _tensors(
        self, batch: Batch, ctx: WorkerContext
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(video [B,Fv,h,w,C], audio [B,Fa,C], captions, ok [B] bool); bad rows are zeroed."""
        video = torch.as_tensor(np.ascontiguousarray(batch["video"]), dtype=torch.float32)
        audio = torch.as_tensor(np.ascontiguousarray(batch["audio"]), dtype=torch.float32)
        ok = torch.isfinite(video.flatten(1)).all(1) & torch.isfinite(audio.flatten(1)).all(1)
        video = torch.where(ok.view(-1, 1, 1, 1, 1), video, 0.0)  # keep shapes, drop from loss
        audio = torch.where(ok.view(-1, 1, 1), audio, 0.0)
        return (
            video.to(ctx.device, ctx.dtype),
            audio.to(ctx.device, ctx.dtype),
            [str(c) for c in batch["caption"]],
            ok,
        )

    def _noised(self, video, audio, g: torch.Generator, ctx: WorkerContext):
        b, fv, fa = video.shape[0], video.shape[1], audio.shape[1]
        # Independent σ per sample and per modality; one σ for all frames of a stream.
        lv, la = ctx.cfg.train.sigma.video, ctx.cfg.train.sigma.audio
        sv = flow.logit_normal([b], g, lv.mean, lv.std).view(b, 1).expand(b, fv)  # [B, Fv]
        sa = flow.logit_normal([b], g, la.mean, la.std).view(b, 1).expand(b, fa)  # [B, Fa]
        tied = ctx.cfg.train.sigma.tied
        if tied > 0:  # drawn only when asked, so untied runs keep their random stream
            same = (torch.rand(b, generator=g) < tied).view(b, 1)
            sa = torch.where(same, sv[:, :1], sa)
        sv, sa = self._staggered(sv, sa, g, ctx)
        sv, sa = sv.to(ctx.device), sa.to(ctx.device)
        nv = flow.randn(video.shape, g, ctx.device, video.dtype)
        na = flow.randn(audio.shape, g, ctx.device, audio.dtype)
        xv, xa = flow.add_noise(video, nv, sv), flow.add_noise(audio, na, sa)
        tv, ta = flow.velocity_target(video, nv), flow.velocity_target(audio, na)
        return xv, xa, sv.to(ctx.dtype), sa.to(ctx.dtype), tv, ta

    def _staggered(self, sv, sa, g: torch.Generator, ctx: WorkerContext):
        """A `train.sigma.stagger` share of the samples moved to per-frame staggered σ [B, F]
        (drawn only when asked, so other runs keep their random stream). σ ≥ 0.02: a finished
        frame of the sampler (σ 0) has no velocity target worth fitting."""
        sig = ctx.cfg.train.sigma
        if sig.stagger <= 0:
            return sv, sa
        b, fv, fa = sv.shape[0], sv.shape[1], sa.shape[1]
        pick = (torch.rand(b, generator=g) < sig.stagger).view(b, 1)
        tau, delta = torch.rand(b, generator=g), torch.rand(b, generator=g) * sig.stagger_max
        n_tokens = fv * self.mcfg.video_tokens_per_frame + fa
        table = flow.ltx2_sigmas(STAGGER_TABLE_STEPS, n_tokens)
        stv = flow.staggered_sigmas(table, tau, delta, fv).clamp(min=0.02)
        sta = flow.staggered_sigmas(table, tau, delta, fa).clamp(min=0.02)
        return torch.where(pick, stv, sv), torch.where(pick, sta, sa)

    def train_step(
        self, step: int, next_batch: Callable[[], Batch], ctx: WorkerContext
    ) -> dict[str, float]:
        t = ctx.cfg.train
        sums = {"loss/video": 0.0, "loss/audio": 0.0, "bad_samples": 0.0}
        self.engine.train()
        for micro in range(t.grad_accum):
            batch = next_batch()
            video, audio, captions, ok = self._tensors(batch, ctx)
            g = ctx.generator(step, micro)
            drop = torch.rand(len(captions), generator=g) < t.text_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            xv, xa, sv, sa, tv, ta = self._noised(video, audio, g, ctx)
            vel_v, vel_a = self.engine(xv, xa, sv, sa, captions)
            w = ok.to(ctx.device, torch.float32) / ok.sum().clamp(min=1)  # [B] weights, bad → 0
            lv = (per_sample_mse(vel_v, tv) * w).sum()
            la = (per_sample_mse(vel_a, ta) * w).sum()
            self.engine.backward(lv + la)
            self.engine.step()
            sums["loss/video"] += lv.item() / t.grad_accum
            sums["loss/audio"] += la.item() / t.grad_accum
            sums["bad_samples"] += float((~ok).sum())
        for ema in self._emas.values():
            ema.update(self.engine.module, step)
        out = {**sums, "loss": sums["loss/video"] + sums["loss/audio"]}
        out["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["lr"] = float(self.engine.get_lr()[0])
        if t.reliance_every and step % t.reliance_every == 0:
            out |= self.reliance(batch, step, ctx)
        return out

    @torch.no_grad()
    def reliance(self, batch: Batch, step: int, ctx: WorkerContext) -> dict[str, float]:
        """Loss increase of each stream when the other stream is shuffled across the batch.

        Same noise and σ for paired and shuffled passes; the shuffle is a roll by one sample, so
        every sample meets another sample's partner stream (needs batch ≥ 2).
        """
        video, audio, captions, _ = self._tensors(batch, ctx)
        if video.shape[0] < 2:
            return {}
        g = ctx.generator(step, 0, purpose=1)
        xv, xa, sv, sa, tv, ta = self._noised(video, audio, g, ctx)
        self.engine.eval()
        pv, pa = self.engine(xv, xa, sv, sa, captions)
        # Audio's loss with mismatched video (and vice versa): roll the *other* stream's input.
        _, sa_shuf = self.engine(xv.roll(1, 0), xa, sv.roll(1, 0), sa, captions)
        sv_shuf, _ = self.engine(xv, xa.roll(1, 0), sv, sa.roll(1, 0), captions)
        self.engine.train()
        return {
            "reliance/audio_on_video": (per_sample_mse(sa_shuf, ta) - per_sample_mse(pa, ta))
            .mean()
            .item(),
            "reliance/video_on_audio": (per_sample_mse(sv_shuf, tv) - per_sample_mse(pv, tv))
            .mean()
            .item(),
        }

    @torch.no_grad()
    def artifacts(self, step: int, out_dir: Path | None, ctx: WorkerContext) -> None:
        """Contact sheet of one clip sampled with 8 Euler steps and CFG 3 (every rank runs the
        forwards: under ZeRO-3 they are collective); rank 0 decodes and writes the PNG."""
        m, sec = self.mcfg, ctx.cfg.data.seconds
        fv, fa = 1 + m.video_block_latents * sec, 1 + m.audio_block_latents * sec
        g = ctx.generator(step, 0, purpose=2)
        nv = flow.randn(
            [1, fv, *m.video_latent_hw, m.video.latent_channels], g, ctx.device, ctx.dtype
        )
        na = flow.randn([1, fa, m.audio.latent_channels], g, ctx.device, ctx.dtype)

        def velocity(
            xv: torch.Tensor, xa: torch.Tensor, s: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
            sv = torch.full((1, fv), s, device=ctx.device, dtype=ctx.dtype)  # [1, Fv]
            sa = torch.full((1, fa), s, device=ctx.device, dtype=ctx.dtype)  # [1, Fa]
            cv, ca = self.engine(xv, xa, sv, sa, ["a red ball"])
            uv, ua = self.engine(xv, xa, sv, sa, [""])
            return flow.guided(cv, uv, 3.0), flow.guided(ca, ua, 3.0)

        self.engine.eval()
        xv, xa = flow.euler_sample(
            velocity, nv, na, flow.ltx2_sigmas(8, fv * m.video_tokens_per_frame)
        )
        self.engine.train()
        if out_dir is None:
            return
        from pipeline.plots import contact_sheet, sample_clip

        vcodec, acodec = load_codecs(ctx.cfg, m)
        frames = vcodec.decode(xv[0].float().cpu())  # uint8 [F, H, W, 3]
        audio = acodec.decode(xa[0].float().cpu())  # float [C, S]
        contact_sheet(
            frames[:: max(1, frames.shape[0] // 16)].numpy(), out_dir / "contact_sheet.png"
        )
        sample_clip(frames.numpy(), audio.numpy(), m.fps, m.sample_rate, out_dir / "sample.mp4")

    def export(self, out_dir: Path | None, ctx: WorkerContext) -> None:
        """EMA (or live) weights gathered from every rank; rank 0 writes a model.Bundle."""
        ema = self._emas.get("teacher")
        full = gather_full(self.engine.module, ema.state() if ema else None)
        if out_dir is not None:
            write_bundle(ctx.cfg, self.mcfg, full, out_dir, {"stage": self.name})


def write_bundle(
    cfg: Any, mcfg: Any, state: dict, out_dir: str | Path, extra: dict, codecs: tuple | None = None
) -> Path:
    """TeacherNet weights (a full state dict) + the run's codecs (or `codecs`, a (video, audio)
    pair) → a model.Bundle at `out_dir`."""
    return teacher_bundle(cfg, mcfg, state, codecs).save_pretrained(out_dir, extra)


def teacher_bundle(cfg: Any, mcfg: Any, state: dict, codecs: tuple | None = None) -> Any:
    """TeacherNet weights (a full state dict) + the run's codecs (or `codecs`) → a model.Bundle."""
    from model.bundle import Bundle

    net = TeacherNet(AVDiT(mcfg), build_text_encoder(cfg, mcfg.text_dim))
    net.load_state_dict(state)  # strict: every weight of the net must come from `state`
    vcodec, acodec = codecs or load_codecs(cfg, mcfg)
    return Bundle(net.dit.eval(), vcodec, acodec, net.text.eval())


def load_codecs(cfg: Any, mcfg: Any) -> tuple[Any, Any]:
    """The fitted codecs of `data.codec_dir` (what `omniforcing data fit-codec` wrote), else
    unfitted default codecs of the preset's geometry (random-latent runs only)."""
    from model.codecs import CellVideoCodec, EnvelopeAudioCodec
    from model.codecs import load_codecs as read_codecs

    # Same default as the data pipeline (pipeline.trainer.build_dataset): <data.path>/codecs.
    d = Path(cfg.data.codec_dir or cfg.data.path.rstrip("/") + "/codecs")
    if (d / "codec.json").is_file():
        return read_codecs(d)
    if cfg.data.source == "shards":
        raise ValueError(
            f"data.codec_dir: no fitted codecs at {d} (run `omniforcing data fit-codec`); "
            "a teacher trained on shards must ship the codecs its latents came from"
        )
    video = CellVideoCodec(mcfg.height, mcfg.width, grid=mcfg.video_latent_hw[0])
    audio = EnvelopeAudioCodec(mcfg.sample_rate, mcfg.audio_latents_per_s, mcfg.audio_channels)
    return video, audio


STAGE = TeacherStage
