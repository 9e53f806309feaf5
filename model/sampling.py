"""Whole-clip sampling: the bidirectional teacher's multi-step Euler sampler with per-modality CFG,
and decoding a latent clip to frames and PCM. The causal student streams instead
(model/streaming.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import flow
from .dit import AVDiT
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
):
    """A denoiser (x_v, x_a, σ) → CFG velocities; cond and uncond run as one batch."""

    def velocity(xv, xa, s):
        b = xv.shape[0]
        sv = torch.full(xv.shape[:2], float(s), device=xv.device)
        sa = torch.full(xa.shape[:2], float(s), device=xa.device)
        if null_text is None or cfg_scales == (1.0, 1.0):
            return model(xv, xa, sv, sa, *text)
        emb, mask = _stack_text(text, null_text)
        vv, va = model(
            torch.cat([xv, xv]),
            torch.cat([xa, xa]),
            torch.cat([sv, sv]),
            torch.cat([sa, sa]),
            emb,
            mask,
        )
        return (
            flow.guided(vv[:b], vv[b:], cfg_scales[0]),
            flow.guided(va[:b], va[b:], cfg_scales[1]),
        )

    return velocity


def _stack_text(a, b):
    """Concatenate two (emb [B,L,D], mask [B,L]) batches, padding to the longer L."""
    (ea, ma), (eb, mb) = a, b
    ma = torch.ones(ea.shape[:2], dtype=torch.bool, device=ea.device) if ma is None else ma
    mb = torch.ones(eb.shape[:2], dtype=torch.bool, device=eb.device) if mb is None else mb
    length = max(ea.shape[1], eb.shape[1])

    def pad(e, m):
        extra = length - e.shape[1]
        if extra:
            e = torch.cat([e, e.new_zeros(e.shape[0], extra, e.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], extra)], dim=1)
        return e, m

    (ea, ma), (eb, mb) = (
        pad(ea, ma),
        pad(eb.expand(ea.shape[0], -1, -1), mb.expand(ea.shape[0], -1)),
    )
    return torch.cat([ea, eb]), torch.cat([ma, mb])


@torch.no_grad()
def sample_teacher(
    model: AVDiT,
    text_encoder,
    prompts: Sequence[str],
    seconds: int,
    generator: torch.Generator,
    steps: int = 40,
    cfg_scales: tuple[float, float] = (3.0, 5.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher clip latents for `prompts`: 40-step Euler on the LTX-2 schedule, CFG per modality."""
    p = next(model.parameters())
    text = text_encoder(list(prompts))
    null = text_encoder([""])
    vs, as_ = clip_shapes(model, seconds, len(prompts))
    nv = flow.randn(vs, generator, p.device, p.dtype)
    na = flow.randn(as_, generator, p.device, p.dtype)
    sigmas = flow.ltx2_sigmas(steps, n_tokens=vs[1] * model.cfg.video_tokens_per_frame + as_[1])
    vel = guided_velocity(model, text, null, cfg_scales)
    return flow.euler_sample(vel, nv, na, sigmas)


def decode_clip(
    bundle, video: torch.Tensor, audio: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of one clip [Fv,h,w,C], [Fa,C] → (frames uint8 [F,H,W,3], audio [channels, S])."""
    return (
        bundle.video_codec.decode(video.float().cpu(), start=0),
        bundle.audio_codec.decode(audio.float().cpu(), start=0),
    )
