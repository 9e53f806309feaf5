"""Rotary position embeddings in physical units (seconds and pixels), LTX-2 style.

Angles are ω_j · (2·p / max_pos − 1) with ω_j = θ^linspace(0, 1, m) · π/2, interleaved per frequency
across axes, leftover dimensions padded at the front with the identity (cos 1, sin 0).

Positions beyond the horizon (`rope_max_seconds`, 20 s for LTX-2): the angle is linear in p, so
q·k depends only on p_q − p_k and the rotation stays well defined past the horizon (the fraction
simply exceeds 1). With the rolling KV cache the distance between a query and any non-prefix key
is bounded by the window (< horizon), so long streams see only trained relative offsets; only the
Global Prefix drifts further away, and the audio sinks, which carry no position at all (identity
rotation), remain an equally reachable anchor at any distance.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_cos_sin(
    pos: torch.Tensor, max_pos: tuple[float, ...], head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [L, n] physical positions → (cos, sin) each [L, head_dim // 2] (float32)."""
    n = pos.shape[-1]
    half = head_dim // 2
    m = half // n  # frequencies per axis
    omega = theta ** torch.linspace(0.0, 1.0, m, dtype=torch.float64) * (math.pi / 2)  # [m]
    scale = torch.tensor(max_pos, dtype=torch.float64)
    frac = 2.0 * pos.to(torch.float64) / scale - 1.0  # [L, n]
    ang = (omega[None, :, None] * frac[:, None, :]).reshape(pos.shape[0], m * n)  # [L, m·n]
    pad = half - m * n
    if pad:
        ang = torch.cat([ang.new_zeros(pos.shape[0], pad), ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def identity_cos_sin(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that leave a vector unrotated (the audio sinks' Identity RoPE)."""
    return torch.ones(length, head_dim // 2), torch.zeros(length, head_dim // 2)


def pair_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, D/2] angles' cos/sin → the [L, D] tables `apply_rope` takes: cos repeated over each
    pair, sin signed (−, +) over each pair."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated on interleaved pairs (x1, x2) → (x1·c − x2·s, x2·c + x1·s), with
    cos/sin [L, D] from `pair_tables`. Three kernels (mul, pair swap, addcmul) rather than the
    seven of the textbook form: a streamed block runs this 8× per layer and forward."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) per pair
    return torch.addcmul(x * cos, swapped, sin)


# ---- physical positions of latents -----------------------------------------------------------


def video_frame_seconds(cfg: ModelConfig, frames: torch.Tensor) -> torch.Tensor:
    """Time (s) of latent frames: midpoint of pixel frames [max(0, 8k−7), max(0, 8k+1))."""
    f = cfg.video_temporal_factor
    start = (f * frames - (f - 1)).clamp(min=0)
    end = (f * frames + 1).clamp(min=0)
    return (start + end).double() / 2.0 / cfg.fps


def audio_frame_seconds(cfg: ModelConfig, frames: torch.Tensor) -> torch.Tensor:
    """Time (s) of audio latents: the centre of their window of 1/rate seconds."""
    return (frames.double() + 0.5) / cfg.audio_latents_per_s


def video_positions(cfg: ModelConfig, frames: torch.Tensor) -> torch.Tensor:
    """[len(frames)·tokens_per_frame, 3] (t s, y px, x px) for the tokens of these latent frames."""
    h, w = cfg.video_latent_hw
    p = cfg.video.patch
    py, px = cfg.pixels_per_cell
    ys = (torch.arange(h // p, dtype=torch.float64) * p + p / 2) * py
    xs = (torch.arange(w // p, dtype=torch.float64) * p + p / 2) * px
    t = video_frame_seconds(cfg, frames)
    grid_t, grid_y, grid_x = torch.meshgrid(t, ys, xs, indexing="ij")
    return torch.stack([grid_t, grid_y, grid_x], dim=-1).reshape(-1, 3)


class RopeTables:
    """cos/sin tables of one forward, per attention kind, in `pair_tables` form [L, D]. Sinks (if
    any) come first in audio."""

    NAMES = ("video_self", "audio_self", "video_cross", "audio_cross")

    def __init__(
        self,
        cfg: ModelConfig,
        video_frames: torch.Tensor,
        audio_frames: torch.Tensor,
        sinks: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the activations' (cast once here, not in every layer's `apply_rope`)."""
        dv = cfg.video.width // cfg.video.heads
        da = cfg.audio.width // cfg.audio.heads
        ms, mp = cfg.rope_max_seconds, cfg.rope_max_pixels
        vpos = video_positions(cfg, video_frames)
        at = audio_frame_seconds(cfg, audio_frames)[:, None]
        # Video tokens share their frame's time in the cross-modal (time-only) RoPE.
        vt = vpos[:, :1]
        self.video_self = rope_cos_sin(vpos, (ms, mp, mp), dv, cfg.rope_theta)
        audio_self = rope_cos_sin(at, (ms,), da, cfg.rope_theta)
        self.video_cross = rope_cos_sin(vt, (ms,), da, cfg.rope_theta)
        audio_cross = rope_cos_sin(at, (ms,), da, cfg.rope_theta)
        if sinks:
            ident = identity_cos_sin(sinks, da)
            audio_self = tuple(torch.cat([i, a]) for i, a in zip(ident, audio_self, strict=True))
            audio_cross = tuple(torch.cat([i, a]) for i, a in zip(ident, audio_cross, strict=True))
        self.video_self = pair_tables(*self.video_self)
        self.audio_self = pair_tables(*audio_self)
        self.video_cross = pair_tables(*self.video_cross)
        self.audio_cross = pair_tables(*audio_cross)
        if device is not None or dtype is not None:
            for name in self.NAMES:
                tables = getattr(self, name)
                setattr(self, name, tuple(t.to(device=device, dtype=dtype) for t in tables))

    def clone(self) -> RopeTables:
        """A copy with tables of its own (static buffers for CUDA graphs)."""
        out = RopeTables.__new__(RopeTables)
        for name in self.NAMES:
            setattr(out, name, tuple(t.clone() for t in getattr(self, name)))
        return out

    def copy_(self, other: RopeTables) -> None:
        """Load `other`'s tables into this object's tensors, in place (same shapes)."""
        for name in self.NAMES:
            for dst, src in zip(getattr(self, name), getattr(other, name), strict=True):
                dst.copy_(src)
