"""LTX-2.0's per-stream input/output modules (arch "ltx2"), computed as diffusers'
`LTX2VideoTransformer3DModel` computes them, so that imported LTX-2 weights give its outputs.

Against our own `_StreamIO` (model/dit.py) three things differ, and only here:
- timestep conditioning is PixArt's AdaLayerNormSingle: sinusoidal features of σ·1000 →
  Linear, SiLU, Linear = the embedded timestep e [D]; then SiLU, Linear → n modulation vectors.
  Separate modules give the 6 main vectors, the 4 cross-modal scale/shift vectors and the cross-
  modal gate (its timestep scaled by `cfg.cross_gate_timestep_scale`);
- the output head shifts and scales by `out_table + e` (one embedding for both vectors);
- the caption projection is Linear, GELU(tanh), Linear, and each stream projects its own half of
  the text features ([video | audio], LTX-2's two connector outputs).
The cross-modal rows come out in LTX-2's order (scale, shift, scale, shift, gate): the layer reads
them through `AVLayer`'s row indices. The weights' names are ours; pipeline/ltx2 maps diffusers'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

FEATURES = 256  # sinusoidal timestep channels (diffusers' Timesteps(256, flip_sin_to_cos=True))


def scaled_timestep_features(t: torch.Tensor, dim: int = FEATURES) -> torch.Tensor:
    """Sinusoidal [cos | sin] features of an already scaled timestep t (σ·1000): [...] → [..., dim]
    (float32). The frequencies are diffusers' get_timestep_embedding(downscale_freq_shift=0)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    ang = t.float()[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class AdaLayerNormSingle(nn.Module):
    """Timestep features [..., 256] → (n modulation vectors [..., n·D], embedded timestep [..., D])."""

    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(FEATURES, width)
        self.linear_2 = nn.Linear(width, width)
        self.linear = nn.Linear(width, n * width)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.linear_2(nn.functional.silu(self.linear_1(feats)))
        return self.linear(nn.functional.silu(emb)), emb


class LTX2StreamIO(nn.Module):
    """One stream's input projection, timestep modulation, caption projection and output head.

    Same interface as model.dit._StreamIO: `embed(σ)` → (head features, main [B,F,6,D], cross
    [B,F,5,D]) and `head(x, feats, x_in)`; `caption(text_half)` → [B, L, D]."""

    def __init__(self, token_dim: int, width: int, text_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.width = width
        self.gate_scale = cfg.cross_gate_timestep_scale
        self.patchify = nn.Linear(token_dim, width)
        self.time = AdaLayerNormSingle(width, 6)
        self.cross_time = AdaLayerNormSingle(width, 4)
        self.cross_gate = AdaLayerNormSingle(width, 1)
        self.caption = nn.Sequential(
            nn.Linear(text_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width)
        )
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, width) / width**0.5)
        self.proj_out = nn.Linear(width, token_dim)
        self.skip = None

    def embed(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """sigma [B, F] → (embedded timestep [B,F,D], main [B,F,6,D], cross [B,F,5,D])."""
        dtype = self.patchify.weight.dtype
        b, n = sigma.shape
        t = sigma.float() * 1000.0  # diffusers' timestep (× timestep_scale_multiplier)
        mod, emb = self.time(scaled_timestep_features(t).to(dtype))
        cross, _ = self.cross_time(scaled_timestep_features(t).to(dtype))
        gate, _ = self.cross_gate(scaled_timestep_features(t * self.gate_scale).to(dtype))
        cross = torch.cat([cross.view(b, n, 4, -1), gate.view(b, n, 1, -1)], dim=2)
        return emb, mod.view(b, n, 6, -1), cross

    def head(self, x: torch.Tensor, emb: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """x [B,F,N,D], emb [B,F,D] → velocity tokens [B,F,N,token_dim] (`x_in` unused: no skip)."""
        shift, scale = (self.out_table + emb[:, :, None]).unbind(2)  # each [B, F, D]
        return self.proj_out(self.out_norm(x) * (1 + scale[:, :, None]) + shift[:, :, None])
