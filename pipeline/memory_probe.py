"""Activation memory of the training steps, measured by running the real code on the meta device.

`probe_rollout` runs the student's Self-Forcing rollout (`pipeline.distill.rollout`: the KV cache,
no gradient except at the exit step) and `probe_forward` one full-sequence forward with gradient
(the critic's flow-matching step, the ODE stage's student), under
`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves for backward is counted
once (by storage; parameters are weights, not activations). On the meta device this costs no
memory and, at LTX-2 size, seconds. Two things the meta device would get wrong are fixed here:

- attention: meta has no fused kernel, so `scaled_dot_product_attention` would save the whole
  [B, H, Lq, Lk] probability matrix. While probing it is replaced by a stand-in that saves what
  the fused kernels (flash / memory-efficient on CUDA, flash on CPU) save: q, k, v, out, the
  float32 log-sum-exp [B, H, Lq] and the mask if one is given. The CPU kernel saves exactly that,
  which is what tests/test_memory_plan.py checks (meta probe = real CPU tensors, byte for byte).
- activation checkpointing: the layers' saved tensors are dropped, but the checkpoint keeps each
  layer's inputs; a forward pre-hook on every layer counts those. The backward pass then re-runs
  one layer at a time: `recompute` is the largest single layer call's saved bytes.
It holds no accounting of weights or optimizer state (pipeline.memory does that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model import AVDiT, ModelConfig


@dataclass
class Activations:
    """Bytes of one step's activations on one rank."""

    saved: int  # tensors autograd keeps for backward (+ layer inputs under checkpointing)
    recompute: int  # transient in backward: the largest layer call's saved tensors (0: no ckpt)
    cache: int  # KV cache buffers of the rollout (0 for a full-sequence forward)
    layer: int = 0  # the largest single layer call's saved tensors (with or without ckpt)

    @property
    def peak(self) -> int:
        return self.saved + self.recompute + self.cache


class _FusedSDPA(torch.autograd.Function):
    """Saves what a fused attention kernel saves (q, k, v, out, float32 LSE[, mask])."""

    @staticmethod
    def forward(ctx: Any, q, k, v, mask):  # type: ignore[override]
        b, h, lq, _ = q.shape
        # Laid out [B, Lq, H, d] like the kernels' output, so `transpose(1, 2).flatten(2)` after
        # it is a view, as on the device (a contiguous stand-in would count a copy).
        out = q.new_empty(b, lq, h, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(b, h, lq, dtype=torch.float32)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)  # an additive bias
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # type: ignore[override]
        raise RuntimeError("memory probe: no backward")


@contextmanager
def fused_attention_stand_in() -> Iterator[None]:
    """Replace F.scaled_dot_product_attention with `_FusedSDPA` for the block (meta only)."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **_: Any) -> torch.Tensor:
        return _FusedSDPA.apply(q, k, v, attn_mask)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class _Counter:
    """Unique storages autograd saves (and checkpointed layer inputs), parameters excluded."""

    def __init__(self, net: AVDiT) -> None:
        self.net = net
        self.params = {p.untyped_storage()._cdata for p in net.parameters()}
        self.seen: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # nothing is freed while probing: no address reuse
        self.layer_max = 0
        self._before = 0

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s._cdata not in self.params and s._cdata not in self.seen:
            self.seen[s._cdata] = s.nbytes()
            self.keep.append(t)

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._before = self.total
        if getattr(self.net, "grad_checkpointing", False) and torch.is_grad_enabled():
            for a in args:  # the checkpoint holds the layer's inputs until backward
                if isinstance(a, torch.Tensor):
                    self.add(a)

    def post(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        self.layer_max = max(self.layer_max, self.total - self._before)


def _measure(net: AVDiT, run: Callable[[], Any]) -> tuple[int, int]:
    """(saved bytes, largest layer call's saved bytes) of `run()`."""
    c = _Counter(net)
    hooks = [layer.register_forward_pre_hook(c.pre) for layer in net.layers]
    hooks += [layer.register_forward_hook(c.post) for layer in net.layers]

    def pack(t: torch.Tensor) -> torch.Tensor:
        c.add(t)
        return t

    fused = fused_attention_stand_in() if _on_meta(net) else _nothing()
    try:
        with fused, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return c.total, c.layer_max


def _on_meta(net: AVDiT) -> bool:
    return next(net.parameters()).device.type == "meta"


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _both(
    net: AVDiT, run: Callable[[], None], checkpointing: bool, layer: bool = True
) -> Activations:
    """Saved bytes in the configured mode; the largest layer (the recompute transient under
    checkpointing) from a run without it, unless `layer` is False."""
    net.grad_checkpointing = checkpointing
    saved, most = _measure(net, run)
    cache = getattr(run, "cache_bytes", 0)
    if checkpointing:
        most = 0
        if layer:
            net.grad_checkpointing = False
            _, most = _measure(net, run)
            net.grad_checkpointing = True
    return Activations(saved, most if checkpointing else 0, cache, most)


def build(mcfg: ModelConfig, device: str | torch.device, dtype: torch.dtype) -> AVDiT:
    """The network on `device` (meta: shapes only) in `dtype`."""
    with torch.device(device):
        net = AVDiT(mcfg)
    return net.to(dtype).train()


def _text(net: AVDiT, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(net.parameters())
    emb = torch.zeros(batch, tokens, net.cfg.text_dim, device=p.device, dtype=p.dtype)
    return emb, torch.ones(batch, tokens, dtype=torch.bool, device=p.device)


def probe_rollout(
    net: AVDiT,
    batch: int,
    seconds: int,
    sigmas: list[float],
    text_tokens: int,
    checkpointing: bool,
    layer: bool = True,
) -> Activations:
    """The Self-Forcing generator step's rollout (gradient at the last σ, the longest graph)."""
    from pipeline.distill.rollout import rollout

    text = _text(net, batch, text_tokens)

    def run() -> None:
        g = torch.Generator().manual_seed(0)
        rollout(net, text, seconds, sigmas, g, len(sigmas) - 1)

    cache = net.new_cache(text[0], text[1], seconds)
    run.cache_bytes = cache.nbytes()  # type: ignore[attr-defined]
    return _both(net, run, checkpointing, layer)


def probe_forward(
    net: AVDiT,
    batch: int,
    seconds: int,
    text_tokens: int,
    checkpointing: bool,
    layer: bool = True,
) -> Activations:
    """One full-sequence forward with gradient over a clip of `seconds` (+ the prefix)."""
    cfg = net.cfg
    p = next(net.parameters())
    fv, fa = 1 + cfg.video_block_latents * seconds, 1 + cfg.audio_block_latents * seconds
    h, w = cfg.video_latent_hw
    kw = {"device": p.device, "dtype": p.dtype}
    video = torch.zeros(batch, fv, h, w, cfg.video.latent_channels, **kw)
    audio = torch.zeros(batch, fa, cfg.audio.latent_channels, **kw)
    sv, sa = torch.zeros(batch, fv, **kw), torch.zeros(batch, fa, **kw)
    text = _text(net, batch, text_tokens)

    def run() -> None:
        net(video, audio, sv, sa, *text)

    return _both(net, run, checkpointing, layer)


def by_layers(
    mcfg: ModelConfig, dtype: torch.dtype, probe: Callable[..., Activations], slope: bool = True
) -> Activations:
    """`probe(net, layer=...)` of the whole network from meta networks of 1 and 2 layers: every
    layer is the same module, so each adds the same saved bytes and KV cache (exact:
    tests/test_memory_plan.py); probing 48 layers on the meta device would take minutes. The
    largest layer comes from the 1-layer network; `slope` False: only that (no 2-layer run)."""
    one = probe(build(mcfg.replace(layers=1), "meta", dtype), layer=True)
    if mcfg.layers == 1 or not slope:
        return one
    two = probe(build(mcfg.replace(layers=2), "meta", dtype), layer=False)
    extra = mcfg.layers - 1
    return Activations(
        one.saved + extra * (two.saved - one.saved),
        one.recompute,
        one.cache + extra * (two.cache - one.cache),
        one.layer,
    )
