"""Whole-clip sampling: the bidirectional teacher's multi-step Euler sampler with per-modality CFG,
and decoding a latent clip to frames and PCM. The causal student streams instead
(model/streaming.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import flow
from .dit import AVDiT
from .guidance import BoundGuide, Guide, bind, teacher_velocity
from .layout import BlockLayout


def clip_shapes(model: AVDiT, seconds: int, batch: int = 1) -> tuple[tuple, tuple]:
    cfg = model.cfg
    lay = BlockLayout(seconds, cfg.video_block_latents, cfg.audio_block_latents)
    h, w = cfg.video_latent_hw
    return (
        (batch, lay.num_video, h, w, cfg.video.latent_channels),
        (batch, lay.num_audio, cfg.audio.latent_channels),
    )


def guided_velocity(
    model: AVDiT,
    text: tuple[torch.Tensor, torch.Tensor],
    null_text: tuple[torch.Tensor, torch.Tensor] | None,
    cfg_scales: tuple[float, float],
    guide: BoundGuide | None = None,
):
    """A denoiser (x_v, x_a, σ) → guided velocities, every frame at one σ (`frame_velocity`)."""
    per_frame = frame_velocity(model, text, null_text, cfg_scales, guide)

    def velocity(xv, xa, s):
        sv = torch.full(xv.shape[:2], float(s), device=xv.device)
        sa = torch.full(xa.shape[:2], float(s), device=xa.device)
        return per_frame(xv, xa, sv, sa)

    return velocity


def frame_velocity(
    model: AVDiT,
    text: tuple[torch.Tensor, torch.Tensor],
    null_text: tuple[torch.Tensor, torch.Tensor] | None,
    cfg_scales: tuple[float, float],
    guide: BoundGuide | None = None,
):
    """A denoiser (x_v, x_a, σ_v [B,Fv], σ_a [B,Fa]) → guided velocities at per-frame σ
    (`guidance.teacher_velocity`: CFG with cond and uncond as one batch, plus autoguidance when
    `guide` is given); what `flow.euler_sample_staggered` steps with."""

    def velocity(xv, xa, sv, sa):
        return teacher_velocity(model, xv, xa, sv, sa, text, null_text, cfg_scales, guide)

    return velocity


@torch.no_grad()
def sample_teacher(
    model: AVDiT,
    text_encoder,
    prompts: Sequence[str],
    seconds: int,
    generator: torch.Generator,
    steps: int = 40,
    cfg_scales: tuple[float, float] = (3.0, 5.0),
    guide: Guide | None = None,
    stagger: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher clip latents for `prompts`: 40-step Euler on the LTX-2 schedule, CFG per modality,
    autoguided by `guide` when given (a bundle's `guide`: the sampler it ships with). `stagger`
    Δ > 0 runs the frames on `flow.staggered_sigmas` instead (earlier frames cleaner, at the same
    number of forwards: `flow.staggered_table`); a teacher trained with `train.sigma.stagger`
    knows that condition."""
    p = next(model.parameters())
    text = text_encoder(list(prompts))
    null = text_encoder([""])
    vs, as_ = clip_shapes(model, seconds, len(prompts))
    nv = flow.randn(vs, generator, p.device, p.dtype)
    na = flow.randn(as_, generator, p.device, p.dtype)
    n_tokens = vs[1] * model.cfg.video_tokens_per_frame + as_[1]
    bound = bind(guide, prompts)
    if stagger > 0:
        vel = frame_velocity(model, text, null, cfg_scales, bound)
        table = flow.staggered_table(steps, stagger, n_tokens)
        return flow.euler_sample_staggered(vel, nv, na, table, stagger)
    vel = guided_velocity(model, text, null, cfg_scales, bound)
    return flow.euler_sample(vel, nv, na, flow.ltx2_sigmas(steps, n_tokens=n_tokens))


def decode_clip(
    bundle, video: torch.Tensor, audio: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of one clip [Fv,h,w,C], [Fa,C] → (frames uint8 [F,H,W,3], audio [channels, S])."""
    return (
        bundle.video_codec.decode(video.float().cpu(), start=0),
        bundle.audio_codec.decode(audio.float().cpu(), start=0),
    )
