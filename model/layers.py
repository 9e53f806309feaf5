"""Building blocks of the dual-stream DiT: RMSNorm, attention, AdaLN modulation, one AV layer.

Shapes: a stream's hidden state is [B, F, N, D] (F latent frames, N tokens per frame; audio has
N = 1 and its sinks count as frames). Modulation vectors are per frame: [B, F, 1, D]. Attention
runs on the flattened [B, F·N, D]. Where keys come from (the full sequence with a mask, or a KV
cache) is decided by an `AttentionContext` (model/kv_cache.py), so the layer code is shared by the
training forward and the streaming forward.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


class AttentionContext(Protocol):
    def keys(
        self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def text(self, layer: int, stream: str, compute) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope(self, kind: str, side: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    text_mask: torch.Tensor | None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on CUDA (statistics in fp32), where the spelled-out form was eight
        # launches: norms were a quarter of a streamed block's kernels at LTX-2 size.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with biases and RMSNorm on q and k over the full inner dim (LTX-2)."""

    def __init__(self, q_dim: int, kv_dim: int, inner: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(q_dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.Linear(inner, out_dim)
        self.q_norm = RMSNorm(inner)
        self.k_norm = RMSNorm(inner)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H·d] → [B, H, L, d]
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.q_norm(self.to_q(x)))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_norm(self.to_k(x))), self._heads(self.to_v(x))

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """q [B,H,Lq,d], k/v [B,H,Lk,d]; mask: None, bool [Lq,Lk] / [B,1,1,Lk], or a FlexAttention
        BlockMask → [B, Lq, out_dim]."""
        if mask is None or isinstance(mask, torch.Tensor):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            o = _flex(q.is_cuda)(q, k, v, block_mask=mask)
        return self.to_out(o.transpose(1, 2).flatten(2))


@functools.cache
def _flex(cuda: bool):
    """FlexAttention: compiled into a fused kernel on CUDA; the eager reference elsewhere."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    if cuda:
        return torch.compile(flex_attention, dynamic=False)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x·(1 + scale) + shift in two launches


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, dim * mult)
        self.down = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class AVLayer(nn.Module):
    """One dual-stream layer: self-attn → text cross-attn → A2V / V2A → FFN, per stream AdaLN.

    `ltx2`: LTX-2.0's two differences in the cross-modal step: its 5 modulation rows are
    (scale, shift) for A2V, (scale, shift) for V2A, gate — ours are (shift, scale, …) — and V2A's
    video keys are the video before A2V updated it (ours: after)."""

    def __init__(self, dv: int, hv: int, da: int, ha: int, ffn_mult: int, ltx2: bool = False):
        super().__init__()
        # Rows of the cross-modal tables: (A2V shift, A2V scale, V2A shift, V2A scale).
        self._cross_rows = (1, 0, 3, 2) if ltx2 else (0, 1, 2, 3)
        self._v2a_keys_before_a2v = ltx2
        self.v_self = Attention(dv, dv, dv, hv, dv)
        self.a_self = Attention(da, da, da, ha, da)
        self.v_text = Attention(dv, dv, dv, hv, dv)
        self.a_text = Attention(da, da, da, ha, da)
        # Cross-modal attention in the audio head geometry (inner = audio width, audio heads).
        self.a2v = Attention(dv, da, da, ha, dv)  # video queries audio
        self.v2a = Attention(da, dv, da, ha, da)  # audio queries video
        self.v_ffn = FeedForward(dv, ffn_mult)
        self.a_ffn = FeedForward(da, ffn_mult)
        self.norm = nn.ModuleDict({"v": RMSNorm(dv, affine=False), "a": RMSNorm(da, affine=False)})
        # Learned per-layer offsets added to the shared timestep embeddings (PixArt/LTX style).
        self.v_table = nn.Parameter(torch.randn(6, dv) / dv**0.5)
        self.a_table = nn.Parameter(torch.randn(6, da) / da**0.5)
        self.v_cross_table = nn.Parameter(torch.randn(5, dv) / dv**0.5)
        self.a_cross_table = nn.Parameter(torch.randn(5, da) / da**0.5)

    def forward(self, i: int, vx, ax, vmod, amod, vcm, acm, ctx: AttentionContext):
        """vx [B,Fv,Nv,Dv], ax [B,Fa,1,Da]; vmod [B,Fv,6,Dv], vcm [B,Fv,5,Dv] (audio alike)."""
        nv, na = self.norm["v"], self.norm["a"]
        vm = (self.v_table + vmod).unsqueeze(3).unbind(2)  # 6 × [B, Fv, 1, Dv]
        am = (self.a_table + amod).unsqueeze(3).unbind(2)
        vc = (self.v_cross_table + vcm).unsqueeze(3).unbind(2)  # 5 × [B, Fv, 1, Dv]
        ac = (self.a_cross_table + acm).unsqueeze(3).unbind(2)
        # 1. self-attention per stream.
        # Gated residuals as one addcmul each (x + gate·y): fewer launches per streamed block.
        vy = self._self(i, "video_self", self.v_self, modulate(nv(vx), vm[0], vm[1]), ctx)
        vx = torch.addcmul(vx, vm[2], vy)
        ay = self._self(i, "audio_self", self.a_self, modulate(na(ax), am[0], am[1]), ctx)
        ax = torch.addcmul(ax, am[2], ay)
        # 2. text cross-attention, unmodulated and never masked by time.
        vx = vx + self._text(i, "v", self.v_text, nv(vx), ctx)
        ax = ax + self._text(i, "a", self.a_text, na(ax), ctx)
        # 3. A2V then V2A, each side modulated by its own stream's timestep.
        s1, c1, s2, c2 = self._cross_rows
        vn = nv(vx)
        vq, akv = modulate(vn, vc[s1], vc[c1]), modulate(na(ax), ac[s1], ac[c1])
        vx = torch.addcmul(vx, vc[4], self._cross(i, "a2v", self.a2v, vq, akv, ctx))
        if not self._v2a_keys_before_a2v:
            vn = nv(vx)
        aq, vkv = modulate(na(ax), ac[s2], ac[c2]), modulate(vn, vc[s2], vc[c2])
        ax = torch.addcmul(ax, ac[4], self._cross(i, "v2a", self.v2a, aq, vkv, ctx))
        # 4. FFN per stream.
        vx = torch.addcmul(vx, vm[5], self.v_ffn(modulate(nv(vx), vm[3], vm[4])))
        ax = torch.addcmul(ax, am[5], self.a_ffn(modulate(na(ax), am[3], am[4])))
        return vx, ax

    @staticmethod
    def _self(i: int, kind: str, attn: Attention, x: torch.Tensor, ctx) -> torch.Tensor:
        shape = x.shape
        x = x.flatten(1, 2)
        cos, sin = ctx.rope(kind, "q")
        q = apply_rope(attn.q(x), cos, sin)
        k, v = attn.kv(x)
        k = apply_rope(k, cos, sin)
        k, v, mask = ctx.keys(i, kind, k, v)
        return attn.attend(q, k, v, mask).view(shape)

    @staticmethod
    def _cross(i: int, kind: str, attn: Attention, xq, xkv, ctx) -> torch.Tensor:
        shape = xq.shape
        q = apply_rope(attn.q(xq.flatten(1, 2)), *ctx.rope(kind, "q"))
        k, v = attn.kv(xkv.flatten(1, 2))
        k = apply_rope(k, *ctx.rope(kind, "k"))
        k, v, mask = ctx.keys(i, kind, k, v)
        return attn.attend(q, k, v, mask).view(shape)

    @staticmethod
    def _text(i: int, stream: str, attn: Attention, x: torch.Tensor, ctx) -> torch.Tensor:
        shape = x.shape
        k, v = ctx.text(i, stream, attn.kv)
        mask = ctx.text_mask
        return attn.attend(attn.q(x.flatten(1, 2)), k, v, mask).view(shape)
