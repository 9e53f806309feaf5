"""Streaming generation: the student produces one block (one second) at a time with its KV cache.

`rollout_blocks` is the one block loop. Serving (`StreamingGenerator.stream`) runs it under
`torch.no_grad`; the Self-Forcing trainer runs it with gradients and an exit step, so training
and serving share this code path. Per block: K few-step calls on the block's tokens, then one
σ = 0 call on the clean output that commits the block to the cache (detached). Cost per block is
flat in the clip length once the rolling window is full.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import flow
from .dit import AVDiT
from .graphs import GraphedStream
from .kv_cache import KVCache
from .layout import BlockLayout


@dataclass
class Chunk:
    """One generated block, decoded. Chunk 0 is the Global Prefix (1 frame, 1 audio latent),
    chunk k ≥ 1 one second, except where a codec looks ahead (ChunkDecoder): that modality lags by
    its look-ahead (chunk 0 may be empty, the last carries the tail). t_start/t_end: video."""

    index: int
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    audio: torch.Tensor  # float32 [channels, S]
    t_start: float  # seconds of video before this chunk
    t_end: float
    latency_s: float  # wall time since the request started, when this chunk was ready
    compute_s: float  # wall time spent on this chunk (denoise + commit + decode)
    sample_rate: int
    fps: int


def rollout_blocks(
    model: AVDiT,
    cache: KVCache,
    seconds: int,
    sigmas: Sequence[float],
    generator: torch.Generator,
    exit_step: int | None = None,
    batch: int = 1,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (block, x0_video [B,n,h,w,C], x0_audio [B,n,C]) for blocks 0..seconds.

    `exit_step`: the few-step index whose x0 is the block output (Self-Forcing's stochastic
    truncation; earlier steps run without gradient). None = all steps (inference).
    """
    cfg = model.cfg
    layout = BlockLayout(seconds, cfg.video_block_latents, cfg.audio_block_latents)
    p = next(model.parameters())
    h, w = cfg.video_latent_hw
    for k in range(layout.num_blocks):
        v0, v1 = layout.video_range(k)
        a0, a1 = layout.audio_range(k)
        nv, na = v1 - v0, a1 - a0
        noise_v = flow.randn(
            (batch, nv, h, w, cfg.video.latent_channels), generator, p.device, p.dtype
        )
        noise_a = flow.randn((batch, na, cfg.audio.latent_channels), generator, p.device, p.dtype)

        def predict_x0(xv, xa, s, k=k, nv=nv, na=na):
            sv = torch.full((batch, nv), s, device=p.device)
            sa = torch.full((batch, na), s, device=p.device)
            vel_v, vel_a = model.forward_block(xv, xa, sv, sa, k, cache)
            return flow.x0_from_velocity(xv, vel_v, s), flow.x0_from_velocity(xa, vel_a, s)

        x0v, x0a = flow.few_step(predict_x0, noise_v, noise_a, sigmas, generator, exit_step)
        with torch.no_grad():  # commit the clean block (context noise 0), detached
            zv = torch.zeros(batch, nv, device=p.device)
            za = torch.zeros(batch, na, device=p.device)
            model.forward_block(x0v.detach(), x0a.detach(), zv, za, k, cache, commit=True)
        yield k, x0v, x0a


class ChunkDecoder:
    """Decodes one modality's latents chunk by chunk, in order, carrying across each boundary
    what the codec reads there.

    A codec with `context_latents` c > 0 (a decoder that reads earlier latents: the drawer,
    LTX-2's VAEs) gets the last c latents before each chunk as `context`. A codec with
    `lookahead_latents` L > 0 (one that reads later latents: LTX-2.0's video decoder, the
    vocoder) has each chunk's last L latents held back and decoded with the next chunk, which
    passes them their next latents as `ahead`: the output lags the latents by L, a chunk too short
    to release anything decodes to an empty one, and `flush()` gives the held tail at the end (with
    nothing ahead). Codecs with neither (our cell codecs) decode each chunk alone.
    `time_axis`: the output's time axis (video frames [F, H, W, 3]: 0; audio [channels, S]: 1)."""

    def __init__(self, codec, time_axis: int) -> None:
        self.codec = codec
        self.want = int(getattr(codec, "context_latents", 0))
        self.lookahead = int(getattr(codec, "lookahead_latents", 0))
        self.axis = time_axis
        self.context: torch.Tensor | None = None  # the last `want` latents decoded
        self.held: torch.Tensor | None = None  # latents waiting for their look-ahead
        self.held_start = 0  # latent index of held[0]

    def push(self, latents: torch.Tensor, start: int) -> torch.Tensor:
        """The decoded output of latents [n, ...] starting at latent `start` (what of them, and
        of those held before, has its look-ahead now)."""
        if self.held is not None:
            latents, start = torch.cat([self.held, latents]), self.held_start
            self.held = None
        if not self.lookahead:
            return self._decode(latents, start, None)
        n = len(latents) - self.lookahead
        if n <= 0:  # e.g. a one-latent prefix with L = 1: release nothing yet
            self.held, self.held_start = latents, start
            return self.codec.decode(latents[:1], start=start).narrow(self.axis, 0, 0)
        self.held, self.held_start = latents[n:], start + n
        return self._decode(latents[:n], start, latents[n:])

    def flush(self) -> torch.Tensor | None:
        """The held-back tail decoded with nothing ahead (the stream ended), or None."""
        if self.held is None:
            return None
        held, self.held = self.held, None
        return self._decode(held, self.held_start, None)

    def _decode(self, latents: torch.Tensor, start: int, ahead: torch.Tensor | None):
        if not self.want and ahead is None:
            return self.codec.decode(latents, start=start)
        kwargs = {} if ahead is None else {"ahead": ahead}
        if self.want:
            kwargs["context"] = self.context
        out = self.codec.decode(latents, start=start, **kwargs)
        if self.want:
            seen = latents if self.context is None else torch.cat([self.context, latents])
            self.context = seen[-self.want :]
        return out


# Rolling window (blocks of one second, per modality) of a served stream: the 5 s the students are
# distilled on. Memory and cost per second stay flat however long a stream runs; clips of up to
# 5 s are the same as with no window (the first eviction happens after block 5 is committed).
DEFAULT_WINDOW_S = 5


class StreamingGenerator:
    """Text → a stream of decoded one-second chunks (frames + PCM) from a causal student bundle.

    `window_s`: rolling KV window in seconds, one for both modalities or (video, audio); None
    keeps every block (memory and per-block cost then grow with the clip). `graphs`: stream
    through one reusable `GraphedStream` (CUDA graphs on a GPU, its static buffers eagerly
    elsewhere) when it is free; a second concurrent stream of this generator runs eagerly."""

    def __init__(
        self,
        bundle,
        sigmas: Sequence[float] | None = None,
        window_s: tuple[int | None, int | None] | int | None = DEFAULT_WINDOW_S,
        device: str | torch.device | None = None,
        graphs: bool = False,
    ) -> None:
        self.bundle = bundle
        self.model: AVDiT = bundle.model
        if not self.model.cfg.causal:
            raise ValueError("StreamingGenerator needs a causal student (model.causal = true)")
        # The σ list it was distilled for (its bundle's sampler entry) unless told otherwise.
        own = getattr(bundle, "sigmas", None)
        self.sigmas = tuple(sigmas or own or flow.DEFAULT_STUDENT_SIGMAS)
        if isinstance(window_s, int) or window_s is None:
            window_s = (window_s, window_s)
        self.windows = window_s
        if device is not None:
            bundle.to(device)
        self.device = next(self.model.parameters()).device
        # Built here (it allocates nothing before its first stream) so that a missing window is
        # refused at construction, by GraphedStream's own check.
        self._graphed: GraphedStream | None = None
        if graphs:
            max_len = bundle.text_encoder.max_len
            self._graphed = GraphedStream(self.model, self.windows, max_len)
        self._graphed_free = threading.Lock()

    def new_cache(self, prompt: str, seconds: int) -> KVCache:
        emb, mask = self.bundle.text_encoder([prompt])
        return self.model.new_cache(emb, mask, seconds, self.windows)

    @torch.no_grad()
    def stream(self, prompt: str, seconds: int, seed: int = 0) -> Iterator[Chunk]:
        """Yield chunk 0 (prefix) and one chunk per second; same seed → same chunks."""
        if not isinstance(seconds, int) or seconds < 1:
            raise ValueError(f"seconds must be a positive whole number of blocks, got {seconds!r}")
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed))
        graphed = self._graphed is not None and self._graphed_free.acquire(blocking=False)
        try:
            yield from self._chunks(prompt, seconds, gen, start, graphed)
        finally:
            if graphed:
                self._graphed_free.release()

    def _chunks(self, prompt: str, seconds: int, gen, start: float, graphed: bool):
        cfg = self.model.cfg
        if graphed:
            view = self._graphed
            cache = view.reset(*self.bundle.text_encoder([prompt]))
        else:
            view, cache = self.model, self.new_cache(prompt, seconds)
        layout = BlockLayout(seconds, cfg.video_block_latents, cfg.audio_block_latents)
        t_prev = start
        # Per modality: the context and look-ahead its codec reads across chunk boundaries.
        vdec = ChunkDecoder(self.bundle.video_codec, time_axis=0)
        adec = ChunkDecoder(self.bundle.audio_codec, time_axis=1)
        shown = 0  # frames yielded so far (a look-ahead codec lags the blocks)
        for k, x0v, x0a in rollout_blocks(view, cache, seconds, self.sigmas, gen):
            v0, _ = layout.video_range(k)
            a0, _ = layout.audio_range(k)
            frames = vdec.push(x0v[0].float().cpu(), v0)
            audio = adec.push(x0a[0].float().cpu(), a0)
            if k == layout.num_blocks - 1:  # the last block: what the codecs still hold back
                frames = _join(frames, vdec.flush(), 0)
                audio = _join(audio, adec.flush(), 1)
            now = time.perf_counter()
            t0, shown = shown / cfg.fps, shown + frames.shape[0]
            yield Chunk(
                index=k,
                frames=frames,
                audio=audio,
                t_start=t0,
                t_end=t0 + frames.shape[0] / cfg.fps,
                latency_s=now - start,
                compute_s=now - t_prev,
                sample_rate=cfg.sample_rate,
                fps=cfg.fps,
            )
            t_prev = time.perf_counter()
        del cache


def _join(out: torch.Tensor, tail: torch.Tensor | None, axis: int) -> torch.Tensor:
    return out if tail is None else torch.cat([out, tail], dim=axis)
