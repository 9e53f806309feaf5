"""Streaming with every tensor at a fixed address, so each block shape runs as one CUDA graph.

At LTX-2 size a streamed block is bound by kernel launches, not FLOPs (benchmarks/RESULTS.md:
~60,000 launches and 0.5 s of CPU per block for ~0.3 s of GPU work). A CUDA graph replays a
whole forward with one launch, but only if it reads and writes the same memory every time, and
only for the shapes it was captured with. `GraphedStream` provides both:

- one `KVCache` reused by every stream it serves (`reset`), with a rolling window, so the
  attention lengths and write offsets of a block depend only on where it sits in the window:
  block 0 (the prefix), blocks 1 … w − 1 (the window filling) and every later block (full);
  w + 1 shapes in all, whatever the clip length;
- the text padded to a fixed length with its mask, so every prompt gives the same shapes;
- static input buffers (latents, σ, RoPE tables) that each call copies into.

On CUDA the first call of each shape runs eagerly (on a side stream: the warm-up) and is then
captured; every later call of that shape is a replay. Elsewhere (`capture=False`, the CPU) the
same static buffers run eagerly, which is what the tests compare with the plain path. Graphs are
inference only: the Self-Forcing rollout (gradients through the cache) uses `AVDiT.forward_block`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .dit import AVDiT
from .kv_cache import KVCache
from .rope import RopeTables

__all__ = ["GraphedStream"]


class _Static:
    """Inputs of one block shape (prefix or regular) at fixed addresses."""

    def __init__(self, video, audio, sigma_v, sigma_a, rope: RopeTables) -> None:
        self.video, self.audio = video.clone(), audio.clone()
        self.sigma_v, self.sigma_a = sigma_v.clone(), sigma_a.clone()
        self.rope = rope.clone()
        self.rope_block = -1  # block whose tables are loaded

    def load(self, video, audio, sigma_v, sigma_a, block: int, rope: RopeTables) -> None:
        self.video.copy_(video)
        self.audio.copy_(audio)
        self.sigma_v.copy_(sigma_v)
        self.sigma_a.copy_(sigma_a)
        if block != self.rope_block:  # once per block, not per call
            self.rope.copy_(rope)
            self.rope_block = block


class GraphedStream:
    """A model view for `rollout_blocks` that streams through static buffers and CUDA graphs.

    One stream at a time: `reset` starts the next one (same batch size). `windows` must both be
    set (the rolling window keeps the shapes bounded); `text_len` is the padded prompt length.
    """

    def __init__(
        self,
        model: AVDiT,
        windows: tuple[int, int],
        text_len: int,
        batch: int = 1,
        capture: bool | None = None,
    ) -> None:
        if any(w is None for w in windows):
            raise ValueError(f"GraphedStream needs a rolling window per modality, got {windows}")
        p = next(model.parameters())
        self.model, self.cfg = model, model.cfg
        self.windows, self.text_len, self.batch = tuple(windows), text_len, batch
        self.capture = p.device.type == "cuda" if capture is None else capture
        if self.capture and p.device.type != "cuda":
            raise ValueError("capture=True needs the model on a CUDA device")
        self._device, self._dtype = p.device, p.dtype
        self.cache: KVCache | None = None
        self._static: dict[bool, _Static] = {}  # keyed by "this is block 0"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = None  # one memory pool for all graphs: they replay one at a time
        self.replays = 0  # calls served by a graph replay (tests and benchmarks read it)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    @torch.no_grad()
    def reset(self, text_emb: torch.Tensor, text_mask: torch.Tensor | None) -> KVCache:
        """The (emptied) cache for a new stream of this prompt: text_emb [B, L, text_dim]."""
        b, n, _ = text_emb.shape
        if b != self.batch or n > self.text_len:
            raise ValueError(
                f"GraphedStream holds {self.batch} stream(s) of ≤ {self.text_len} text tokens, "
                f"got {b} of {n}"
            )
        emb = text_emb.new_zeros(b, self.text_len, text_emb.shape[2])
        emb[:, :n] = text_emb
        mask = torch.zeros(b, self.text_len, dtype=torch.bool, device=text_emb.device)
        mask[:, :n] = True if text_mask is None else text_mask
        tv, ta = self.model.project_text(emb.to(self._dtype))
        if self.cache is None:
            cache = KVCache(self.cfg, b, tv, ta, mask, self.windows, 1, self._device, self._dtype)
            self.cache = cache
        else:
            self.cache.reset(tv, ta, mask)
        return self.cache

    @torch.no_grad()
    def forward_block(self, video, audio, sigma_v, sigma_a, block, cache, commit=False):
        """`AVDiT.forward_block` through the static buffers (a replay once the shape is seen).

        The returned tensors are overwritten by the next call: use them before calling again."""
        if cache is not self.cache:
            raise ValueError("GraphedStream.forward_block needs the cache from its own reset()")
        rope, sinks = self.model.block_setup(video, audio, block, cache)
        if sinks not in self._static:
            self._static[sinks] = _Static(video, audio, sigma_v, sigma_a, rope)
        st = self._static[sinks]
        st.load(video, audio, sigma_v, sigma_a, block, rope)
        cache.begin(st.rope, commit)
        # What a graph bakes in: the block shape and the cache's read lengths / write offsets.
        key = (sinks, cache.filled["v"], cache.filled["a"])
        if not self.capture:
            out = self._body(st, sinks)
        elif key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            self.replays += 1
        else:
            out = self._warm_and_capture(key, st, sinks)
        if commit:
            cache.advance()
        return out

    def _body(self, st: _Static, sinks: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model._run(st.video, st.audio, st.sigma_v, st.sigma_a, sinks, self.cache)

    def _warm_and_capture(self, key, st: _Static, sinks: bool):
        """Run this call eagerly on a side stream (its result is this call's answer and the warm-up
        cuBLAS needs), then record the same work as a graph (recording runs no kernel)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._body(st, sinks)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other streams' threads of this replica may keep launching meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self._body(st, sinks)
        self._pool = graph.pool()
        self._graphs[key] = (graph, static_out)
        return out
