"""The dual-stream audio+video DiT (LTX-2-shaped) with OmniForcing's block-causal mode.

`AVDiT.forward` is the one full-sequence forward used for training (block-causal masks when
`cfg.causal`, bidirectional otherwise). `AVDiT.forward_block` runs one block's tokens against a
`KVCache` (streaming). Both share every module and give the same numbers (tests/test_model.py).
The network predicts velocity v = noise − x0 per latent token.

Legend: B batch, Fv/Fa latent frames, h×w latent grid, Cv/Ca latent channels, Nv tokens per
video frame, Dv/Da stream widths, S sinks, L text tokens.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .kv_cache import FullContext, KVCache
from .layers import AVLayer
from .layout import BlockLayout
from .ltx2 import LTX2StreamIO
from .masks import TrainingMasks
from .rope import RopeTables


def timestep_features(sigma: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features of σ·1000: [...] → [..., dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)
    ang = sigma.float()[..., None] * 1000.0 * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class _StreamIO(nn.Module):
    """Per-stream input projection, timestep embeddings, caption projection and output head."""

    def __init__(self, token_dim: int, width: int, text_dim: int, skip: bool) -> None:
        super().__init__()
        self.width = width
        self.patchify = nn.Linear(token_dim, width)
        self.time = _mlp(256, width, 6 * width)  # main AdaLN (6 vectors per layer)
        self.cross_time = _mlp(256, width, 5 * width)  # cross-modal AdaLN (4 + gate)
        self.out_time = _mlp(256, width, 2 * width)
        self.caption = _mlp(text_dim, width, width)
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, width) / width**0.5)
        self.proj_out = nn.Linear(width, token_dim)
        if skip:  # gated input→output skip: lets the noise part of v pass wide tokens
            self.skip = nn.Linear(token_dim, token_dim)
            self.skip_gate = nn.Linear(width, token_dim)
            for p in (*self.skip.parameters(), *self.skip_gate.parameters()):
                nn.init.zeros_(p)
        else:
            self.skip = None

    def embed(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """sigma [B, F] → (feats [B,F,256], mod [B,F,6,D], cross [B,F,5,D])."""
        f = timestep_features(sigma).to(self.patchify.weight.dtype)  # bf16 models on GPU
        b, n = sigma.shape
        return f, self.time(f).view(b, n, 6, -1), self.cross_time(f).view(b, n, 5, -1)

    def head(self, x: torch.Tensor, feats: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """x [B,F,N,D], feats [B,F,256], x_in [B,F,N,token_dim] → velocity tokens."""
        shift, scale = (self.out_table + self.out_time(feats).unflatten(-1, (2, -1))).unbind(2)
        y = self.proj_out(self.out_norm(x) * (1 + scale[:, :, None]) + shift[:, :, None])
        if self.skip is not None:
            gate = self.skip_gate(self.out_time[0](feats))[:, :, None]
            y = y + self.skip(x_in) * (1 + gate)
        return y


def _checkpointed(layer: AVLayer, i: int, *args: torch.Tensor | object) -> tuple:
    """One layer under torch.utils.checkpoint: autograd keeps its inputs only and the backward
    pass runs the layer again. A KV cache is read again then, after later blocks were committed:
    the layer sees the cache as it was at this call (`KVCache.frozen`, checked unevicted)."""
    *tensors, ctx = args
    state = ctx.snapshot() if hasattr(ctx, "snapshot") else None

    def run(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with ctx.frozen(state) if state is not None else nullcontext():
            return layer(i, *xs, ctx)

    return checkpoint(run, *tensors, use_reentrant=False)


class AVDiT(nn.Module):
    """Dual-stream DiT. Parallelism wraps `repeated_blocks` from outside (pipeline/parallelize)."""

    repeated_blocks = ("layers",)
    # Parameters read outside their own module's forward (streaming, output heads): a sharding
    # wrapper that gathers weights in forward hooks must keep these whole (ZeRO-3 persistence).
    params_outside_forward = ("audio_sinks", "video_io.out_table", "audio_io.out_table")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Activation checkpointing of each layer when gradients are on: set from outside
        # (pipeline.parallelize, train.gradient_checkpointing); the numbers are the same.
        self.grad_checkpointing = False
        v, a = cfg.video, cfg.audio
        ltx2 = cfg.arch == "ltx2"
        if ltx2:  # each stream projects its own half of [video text | audio text]
            half = cfg.text_dim // 2
            self.video_io = LTX2StreamIO(cfg.video_token_dim, v.width, half, cfg)
            self.audio_io = LTX2StreamIO(a.latent_channels, a.width, half, cfg)
        else:
            self.video_io = _StreamIO(cfg.video_token_dim, v.width, cfg.text_dim, cfg.input_skip)
            self.audio_io = _StreamIO(a.latent_channels, a.width, cfg.text_dim, cfg.input_skip)
        self.layers = nn.ModuleList(
            AVLayer(v.width, v.heads, a.width, a.heads, cfg.ffn_mult, ltx2)
            for _ in range(cfg.layers)
        )
        if cfg.sinks:
            self.audio_sinks = nn.Parameter(torch.randn(1, cfg.sinks, a.width) * 0.02)

    # ---- token packing ----------------------------------------------------------------------
    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, h, w, C] → [B, F, Nv, p·p·C]."""
        b, f, h, w, c = video.shape
        p = self.cfg.video.patch
        x = video.view(b, f, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f, (h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, F, Nv, p·p·C] → [B, F, h, w, C]."""
        b, f = tokens.shape[:2]
        h, w = self.cfg.video_latent_hw
        p, c = self.cfg.video.patch, self.cfg.video.latent_channels
        x = tokens.view(b, f, h // p, w // p, p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f, h, w, c)

    # ---- the shared trunk -------------------------------------------------------------------
    def _run(self, video, audio, sigma_v, sigma_a, with_sinks: bool, ctx):
        """video [B,Fv,h,w,C], audio [B,Fa,C] → velocities of the same shapes."""
        vin = self.patchify(video)  # [B, Fv, Nv, Tv]
        ain = audio[:, :, None]  # [B, Fa, 1, Ca]
        vx = self.video_io.patchify(vin)
        ax = self.audio_io.patchify(ain)
        vfeat, vmod, vcm = self.video_io.embed(sigma_v)
        if with_sinks:  # sinks take A0's timestep; they are frames of their own in audio
            s = self.cfg.sinks
            sig_a = torch.cat([sigma_a[:, :1].expand(-1, s), sigma_a], dim=1)
            sinks = self.audio_sinks.to(ax.dtype).expand(ax.shape[0], -1, -1)[:, :, None]
            ax = torch.cat([sinks, ax], dim=1)
        else:
            sig_a = sigma_a
        afeat, amod, acm = self.audio_io.embed(sig_a)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                vx, ax = _checkpointed(layer, i, vx, ax, vmod, amod, vcm, acm, ctx)
            else:
                vx, ax = layer(i, vx, ax, vmod, amod, vcm, acm, ctx)
        if with_sinks:  # stripped before the output head, never supervised
            ax, afeat = ax[:, self.cfg.sinks :], afeat[:, self.cfg.sinks :]
        vel_v = self.unpatchify(self.video_io.head(vx, vfeat, vin))
        vel_a = self.audio_io.head(ax, afeat, ain)[:, :, 0]
        return vel_v, vel_a

    def project_text(self, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_emb [B, L, text_dim] → per-stream text [B, L, Dv], [B, L, Da]. Arch "ltx2": the
        video half and the audio half of the features go to their own projection."""
        if self.cfg.arch == "ltx2":
            tv, ta = text_emb.chunk(2, dim=-1)
            return self.video_io.caption(tv), self.audio_io.caption(ta)
        return self.video_io.caption(text_emb), self.audio_io.caption(text_emb)

    def forward(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        sigma_v: torch.Tensor,
        sigma_a: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        windows: tuple[int | None, int | None] = (None, None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-sequence forward → (vel_v [B,Fv,h,w,Cv], vel_a [B,Fa,Ca])."""
        cfg = self.cfg
        fv, fa = video.shape[1], audio.shape[1]
        dev = video.device
        sinks = cfg.sinks
        rope = RopeTables(cfg, torch.arange(fv), torch.arange(fa), sinks, dev, video.dtype)
        masks = None
        if cfg.causal:
            layout = BlockLayout.from_counts(
                fv, fa, cfg.video_block_latents, cfg.audio_block_latents
            )
            masks = TrainingMasks(
                layout, cfg.video_tokens_per_frame, sinks, windows, dev, backend=cfg.attention
            )
        tv, ta = self.project_text(text_emb)
        ctx = FullContext(rope, masks, tv, ta, text_mask)
        return self._run(video, audio, sigma_v, sigma_a, sinks > 0, ctx)

    # ---- streaming --------------------------------------------------------------------------
    def new_cache(
        self,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None,
        seconds: int,
        windows: tuple[int | None, int | None] = (None, None),
    ) -> KVCache:
        """An empty cache for `text_emb.shape[0]` streams of `seconds` blocks after the prefix."""
        if not self.cfg.causal:
            raise ValueError("streaming needs a causal model (cfg.causal=True)")
        p = next(self.parameters())
        tv, ta = self.project_text(text_emb)
        return KVCache(
            self.cfg,
            text_emb.shape[0],
            tv,
            ta,
            text_mask,
            windows,
            max(seconds, 1),
            p.device,
            p.dtype,
        )

    def forward_block(
        self,
        video: torch.Tensor,
        audio: torch.Tensor,
        sigma_v: torch.Tensor,
        sigma_a: torch.Tensor,
        block: int,
        cache: KVCache,
        commit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's latents against the cache. `commit=True` (the σ = 0 call) writes the cache.

        video [B, n_v, h, w, C], audio [B, n_a, C] with n = 1 for block 0, else 3 / 25.
        """
        rope, sinks = self.block_setup(video, audio, block, cache)
        cache.begin(rope, commit)
        out = self._run(video, audio, sigma_v, sigma_a, sinks, cache)
        if commit:
            cache.advance()
        return out

    def block_setup(
        self, video: torch.Tensor, audio: torch.Tensor, block: int, cache: KVCache
    ) -> tuple[RopeTables, bool]:
        """Check a block call against the cache → (its RoPE tables, whether sinks lead its audio).

        The tables are made once per block (the K + 1 calls of a block share them)."""
        cfg = self.cfg
        if block != cache.blocks_committed:
            raise ValueError(
                f"block {block} out of order: the cache expects {cache.blocks_committed}"
            )
        layout = BlockLayout(block, cfg.video_block_latents, cfg.audio_block_latents)
        v0, v1 = layout.video_range(block)
        a0, a1 = layout.audio_range(block)
        if video.shape[1] != v1 - v0 or audio.shape[1] != a1 - a0:
            raise ValueError(
                f"block {block} needs {v1 - v0} video and {a1 - a0} audio latents, "
                f"got {video.shape[1]} and {audio.shape[1]}"
            )
        sinks = cfg.sinks if block == 0 else 0

        def tables() -> RopeTables:
            v, a = torch.arange(v0, v1), torch.arange(a0, a1)
            return RopeTables(cfg, v, a, sinks, video.device, video.dtype)

        return cache.block_rope(block, tables), sinks > 0

    # ---- reporting --------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameters per stream: A2V counts for video (its queries), V2A for audio."""
        counts = {"video": 0, "audio": 0, "shared": 0}
        for name, p in self.named_parameters():
            leaf = name.split(".")
            if any(t.startswith(("v_", "video_io", "a2v")) for t in leaf):
                counts["video"] += p.numel()
            elif any(t.startswith(("a_", "audio_io", "v2a", "audio_sinks")) for t in leaf):
                counts["audio"] += p.numel()
            else:
                counts["shared"] += p.numel()
        counts["total"] = sum(counts.values())
        return counts
