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


# ---- LTX-2.0 (arch "ltx2"): diffusers' LTX2AudioVideoRotaryPosEmbed, op for op -------------------
# Positions are midpoints of [start, end) spans computed in float32 (only θ^linspace is float64),
# RoPE spans the whole inner dim (heads take consecutive slices of the frequencies), and audio
# latents sit at mel-frame spans. Element-wise, so the rows of any frame subset (one streamed
# block) are bit-for-bit the rows of the whole clip.


def ltx2_video_coords(cfg: ModelConfig, frames: torch.Tensor) -> torch.Tensor:
    """[len(frames)·h·w, 3] float32 (t s, y px, x px) span midpoints of video tokens."""
    f, off = cfg.video_temporal_factor, cfg.rope_causal_offset
    fr = frames.to(torch.float32)
    t0 = ((fr * f) + off - f).clamp(min=0) / cfg.fps
    t1 = (((fr + 1) * f) + off - f).clamp(min=0) / cfg.fps
    h, w = cfg.video_latent_hw
    py, px = cfg.pixels_per_cell
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    mid = [(t0 + t1) / 2.0, (ys * py + (ys + 1) * py) / 2.0, (xs * px + (xs + 1) * px) / 2.0]
    grid = torch.meshgrid(*mid, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def ltx2_audio_coords(cfg: ModelConfig, frames: torch.Tensor) -> torch.Tensor:
    """[len(frames), 1] float32 seconds: midpoints of mel spans [max(0, 4k−3), 4k+1) · hop."""
    m, off = cfg.audio_mel_per_latent, cfg.rope_causal_offset
    fr = frames.to(torch.float32)
    hop, sr = cfg.audio_hop_length, cfg.sample_rate
    t0 = ((fr * m) + off - m).clip(min=0) * hop / sr
    t1 = (((fr + 1) * m) + off - m).clip(min=0) * hop / sr
    return ((t0 + t1) / 2.0)[:, None]


def ltx2_cos_sin(
    coords: torch.Tensor, max_pos: tuple[float, ...], dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """coords [L, n] float32 → (cos, sin) [L, dim // 2] over the whole inner dim (front-padded
    with the identity when dim is not a multiple of 2n)."""
    n = coords.shape[-1]
    steps = dim // (2 * n)
    grid = torch.stack([coords[:, i] / max_pos[i] for i in range(n)], dim=-1)  # [L, n]
    pow_indices = torch.pow(theta, torch.linspace(0.0, 1.0, steps, dtype=torch.float64))
    freqs = (pow_indices * math.pi / 2.0).to(torch.float32)
    ang = ((grid.unsqueeze(-1) * 2 - 1) * freqs).transpose(-1, -2).flatten(1)  # [L, steps·n]
    pad = dim // 2 - ang.shape[-1]
    cos, sin = ang.cos(), ang.sin()
    if pad:
        cos = torch.cat([cos.new_ones(cos.shape[0], pad), cos], dim=-1)
        sin = torch.cat([sin.new_zeros(sin.shape[0], pad), sin], dim=-1)
    return cos, sin


def _ltx2_tables(cfg: ModelConfig, video_frames: torch.Tensor, audio_frames: torch.Tensor):
    """(video_self, audio_self, video_cross, audio_cross) (cos, sin) pairs [L, inner // 2]."""
    ms, mp, th = cfg.rope_max_seconds, cfg.rope_max_pixels, cfg.rope_theta
    vc, ac = ltx2_video_coords(cfg, video_frames), ltx2_audio_coords(cfg, audio_frames)
    dv, da = cfg.video.width, cfg.audio.width
    return (
        ltx2_cos_sin(vc, (ms, mp, mp), dv, th),
        ltx2_cos_sin(ac, (ms,), da, th),
        ltx2_cos_sin(vc[:, :1], (ms,), da, th),  # cross-modal: time only, audio geometry
        ltx2_cos_sin(ac, (ms,), da, th),
    )


def _per_head(table: torch.Tensor, heads: int) -> torch.Tensor:
    """[L, H·d] → [H, L, d]: a whole-inner-dim table for queries/keys of shape [B, H, L, d]."""
    return table.unflatten(-1, (heads, -1)).transpose(0, 1).contiguous()


class RopeTables:
    """cos/sin tables of one forward, per attention kind, in `pair_tables` form [L, D] (arch
    "ltx2": [H, L, d], a different rotation per head). Sinks (if any) come first in audio."""

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
        ltx2 = cfg.arch == "ltx2"
        dv = cfg.video.width // cfg.video.heads
        da = cfg.audio.width // cfg.audio.heads
        if ltx2:
            self.video_self, audio_self, self.video_cross, audio_cross = _ltx2_tables(
                cfg, video_frames, audio_frames
            )
        else:
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
            ident = identity_cos_sin(sinks, cfg.audio.width if ltx2 else da)
            audio_self = tuple(torch.cat([i, a]) for i, a in zip(ident, audio_self, strict=True))
            audio_cross = tuple(torch.cat([i, a]) for i, a in zip(ident, audio_cross, strict=True))
        self.video_self = pair_tables(*self.video_self)
        self.audio_self = pair_tables(*audio_self)
        self.video_cross = pair_tables(*self.video_cross)
        self.audio_cross = pair_tables(*audio_cross)
        if ltx2:
            heads = {"video_self": cfg.video.heads}
            for name in self.NAMES:
                h = heads.get(name, cfg.audio.heads)
                setattr(self, name, tuple(_per_head(t, h) for t in getattr(self, name)))
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
