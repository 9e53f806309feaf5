"""Attention contexts: where a layer's keys come from.

`FullContext` serves the one full-sequence forward (keys = the sequence itself, block masks).
`KVCache` serves streaming: per layer four modality-independent caches (video-self, audio-self,
A2V = audio keys, V2A = video keys) plus text K/V computed once. Keys are stored after RoPE, at
absolute physical positions, so a cached key never needs re-rotation.

Buffer layout per (layer, kind): [B, H, capacity, d] = [prefix | committed blocks | scratch].
The prefix (V0 or sinks + A0) is never evicted. A denoising call writes the current block's K/V
into the scratch slot right after the committed ones (no copy of the past) and attends over
[0, filled + n); the σ = 0 call commits the clean K/V there. Once more than `window − 1` blocks
are committed the oldest is evicted by one shift of the window (per block, not per call).
With gradients enabled (Self-Forcing exit step) nothing is written: the new K/V are concatenated
so autograd never sees an in-place update of the cache, and cached entries are always detached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config import ModelConfig
from .masks import TrainingMasks
from .rope import RopeTables

# kind → which stream's tokens make its keys
KEY_STREAM = {"video_self": "v", "v2a": "v", "audio_self": "a", "a2v": "a"}
_ROPE = {
    ("video_self", "q"): "video_self",
    ("video_self", "k"): "video_self",
    ("audio_self", "q"): "audio_self",
    ("audio_self", "k"): "audio_self",
    ("a2v", "q"): "video_cross",
    ("a2v", "k"): "audio_cross",
    ("v2a", "q"): "audio_cross",
    ("v2a", "k"): "video_cross",
}


def _mask4(text_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if text_mask is None else text_mask[:, None, None, :]


class FullContext:
    """Keys = the whole sequence; masks from `TrainingMasks` (None = bidirectional)."""

    def __init__(self, rope: RopeTables, masks: TrainingMasks | None, text_v, text_a, text_mask):
        self._rope, self._masks = rope, masks
        self._text = {"v": text_v, "a": text_a}
        self.text_mask = _mask4(text_mask)

    def keys(self, layer: int, kind: str, k, v):
        return k, v, None if self._masks is None else getattr(self._masks, kind)

    def text(self, layer: int, stream: str, compute):
        return compute(self._text[stream])

    def rope(self, kind: str, side: str):
        return getattr(self._rope, _ROPE[(kind, side)])


class _Slot:
    """One (layer, kind) buffer of post-RoPE keys and values."""

    def __init__(self, shape: tuple[int, int, int, int], device, dtype) -> None:
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class KVCache:
    """Rolling per-modality KV cache for one batch of streams (see the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        text_v: torch.Tensor,
        text_a: torch.Tensor,
        text_mask: torch.Tensor | None,
        windows: tuple[int | None, int | None] = (None, None),
        max_blocks: int = 64,
        device=None,
        dtype=torch.float32,
    ) -> None:
        self.cfg = cfg
        self.windows = windows
        ntok = cfg.video_tokens_per_frame
        self.prefix = {"v": ntok, "a": cfg.sinks + 1}
        self.block = {"v": cfg.video_block_latents * ntok, "a": cfg.audio_block_latents}
        self.slots_per_stream = {}
        for s, w in zip("va", windows, strict=True):
            if w is not None and w < 1:
                raise ValueError(f"window must be ≥ 1 block, got {w}")
            self.slots_per_stream[s] = (w if w is not None else max_blocks) * self.block[s]
        self.capacity = {s: self.prefix[s] + self.slots_per_stream[s] for s in "va"}
        self.filled = {"v": 0, "a": 0}
        self.blocks_committed = 0
        heads, dim = cfg.audio.heads, cfg.audio.width // cfg.audio.heads
        geom = {
            "video_self": (cfg.video.heads, cfg.video.width // cfg.video.heads),
            "audio_self": (heads, dim),
            "a2v": (heads, dim),
            "v2a": (heads, dim),
        }
        self._slots = [
            {
                kind: _Slot((batch, h, self.capacity[KEY_STREAM[kind]], d), device, dtype)
                for kind, (h, d) in geom.items()
            }
            for _ in range(cfg.layers)
        ]
        self._text_in = {"v": text_v, "a": text_a}
        self._text_kv: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_fn: dict[tuple[int, str], object] = {}  # how each entry was made (for reset)
        self.text_mask = _mask4(text_mask)
        self.commit = False  # set by the model for the σ = 0 call
        self._rope: RopeTables | None = None
        self._block_rope: tuple[int, RopeTables] | None = None
        self.evictions = 0  # shifts of the window so far (a checkpointed call must see none)

    def reset(
        self, text_v: torch.Tensor, text_a: torch.Tensor, text_mask: torch.Tensor | None
    ) -> None:
        """Empty the cache for a new stream with the same shapes, in place: every buffer keeps its
        address (CUDA graphs captured on this cache stay valid). Text K/V are recomputed into
        their buffers; entries past `filled` are never read, so the old keys need no clearing."""
        if (text_mask is None) != (self.text_mask is None):
            raise ValueError(
                "reset: a text mask is needed exactly when the cache was built with one"
            )
        if text_v.shape != self._text_in["v"].shape or text_a.shape != self._text_in["a"].shape:
            raise ValueError(
                f"reset: text {tuple(text_v.shape)} / {tuple(text_a.shape)} differs from the "
                f"cache's {tuple(self._text_in['v'].shape)} / {tuple(self._text_in['a'].shape)}"
            )
        self._text_in = {"v": text_v, "a": text_a}
        with torch.no_grad():
            for key, (k, v) in self._text_kv.items():
                nk, nv = self._text_fn[key](self._text_in[key[1]])
                k.copy_(nk)
                v.copy_(nv)
            if text_mask is not None:
                self.text_mask.copy_(_mask4(text_mask))
        self.filled = {"v": 0, "a": 0}
        self.blocks_committed = 0
        self.commit, self._rope, self._block_rope = False, None, None
        self.evictions += 1  # every entry may change: no recompute may span a reset

    def block_rope(self, block: int, make) -> RopeTables:
        """The RoPE tables of `block`, made by `make()` once and shared by its K + 1 calls."""
        if self._block_rope is None or self._block_rope[0] != block:
            self._block_rope = (block, make())
        return self._block_rope[1]

    # ---- activation checkpointing (model.dit._checkpointed) -----------------------------------
    def snapshot(self) -> tuple:
        """What a layer call reads besides the buffers: (filled, commit, RoPE, evictions)."""
        return dict(self.filled), self.commit, self._rope, self.evictions

    @contextmanager
    def frozen(self, state: tuple) -> Iterator[None]:
        """Run as at `snapshot()` (backward's recompute). Entries below the snapshot's `filled`
        are unchanged until an eviction shifts them: a recompute after one is refused."""
        filled, commit, rope, evictions = state
        if self.evictions != evictions:
            raise RuntimeError(
                "activation checkpointing: the KV cache was evicted between a layer's forward "
                "and its recompute (a rolling window with gradients; disable one of them)"
            )
        now = self.filled, self.commit, self._rope
        self.filled, self.commit, self._rope = dict(filled), commit, rope
        try:
            yield
        finally:
            self.filled, self.commit, self._rope = now

    # ---- used by the layers -------------------------------------------------------------------
    def begin(self, rope: RopeTables, commit: bool) -> None:
        self._rope, self.commit = rope, commit

    def rope(self, kind: str, side: str):
        return getattr(self._rope, _ROPE[(kind, side)])

    def text(self, layer: int, stream: str, compute):
        key = (layer, stream)
        if key not in self._text_kv:
            with torch.no_grad():
                self._text_kv[key] = compute(self._text_in[stream])
            self._text_fn[key] = compute
        return self._text_kv[key]

    def keys(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        s = KEY_STREAM[kind]
        slot, f, n = self._slots[layer][kind], self.filled[s], k.shape[2]
        if f + n > self.capacity[s]:
            raise RuntimeError(f"KV cache overflow for {kind}: {f}+{n} > {self.capacity[s]}")
        if self.commit or not (torch.is_grad_enabled() and k.requires_grad):
            slot.k[:, :, f : f + n] = k.detach()
            slot.v[:, :, f : f + n] = v.detach()
            return slot.k[:, :, : f + n], slot.v[:, :, : f + n], None
        return (
            torch.cat([slot.k[:, :, :f], k], dim=2),
            torch.cat([slot.v[:, :, :f], v], dim=2),
            None,
        )

    # ---- used by the model after a committing call ------------------------------------------------
    def advance(self) -> None:
        """Accept the just-committed block; evict the oldest block when past the window."""
        first = self.blocks_committed == 0
        for s in "va":
            self.filled[s] += self.prefix[s] if first else self.block[s]
        self.blocks_committed += 1
        for s, w in zip("va", self.windows, strict=True):
            committed = (self.filled[s] - self.prefix[s]) // self.block[s]
            if w is not None and committed > w - 1:
                self._evict(s)

    def _evict(self, s: str) -> None:
        p, b, f = self.prefix[s], self.block[s], self.filled[s]
        for layer in self._slots:
            for kind, slot in layer.items():
                if KEY_STREAM[kind] != s:
                    continue
                for buf in (slot.k, slot.v):
                    buf[:, :, p : f - b] = buf[:, :, p + b : f].clone()
        self.filled[s] = f - b
        self.evictions += 1

    def nbytes(self) -> int:
        """Bytes held by the cache buffers (for memory accounting and benchmarks)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self._slots
            for slot in layer.values()
            for t in (slot.k, slot.v)
        )
