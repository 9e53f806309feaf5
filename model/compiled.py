"""Regional `torch.compile` of the DiT for streaming: each `AVLayer` compiled in place.

Why per layer and not the whole model: the 48 layers are one code object, and Dynamo treats a
module's parameters as inputs, so one compiled artefact serves every layer (compile time of one
layer, not 48). What it buys on a GPU: the norms, modulations, RoPE and gated residuals between
the matmuls fuse into a few Triton kernels, where eager PyTorch launches ~100 small kernels per
layer and forward: at LTX-2 size a streamed block was bound by those launches (see RESULTS.md).

The attention context (`KVCache` / `FullContext`: cache writes, RoPE tables, text K/V) keeps
Python state that changes every block (fill levels, the layer index into its buffers); traced, it
would recompile per layer and per block. It runs eagerly, between the compiled regions.
"""

from __future__ import annotations

import torch

from .dit import AVDiT
from .kv_cache import FullContext, KVCache

_CONTEXT_METHODS = ("keys", "text", "rope")
_RECOMPILE_LIMIT = 64  # shapes: prefix block, first blocks while the window fills, steady state


def _eager_contexts() -> None:
    """Mark the context methods as never traced (idempotent; a no-op for eager callers)."""
    for cls in (KVCache, FullContext):
        for name in _CONTEXT_METHODS:
            fn = getattr(cls, name)
            if not getattr(fn, "_eager_region", False):
                wrapped = torch.compiler.disable(fn)
                wrapped._eager_region = True
                setattr(cls, name, wrapped)


def compile_layers(model: AVDiT, mode: str | None = None, dynamic: bool = True) -> AVDiT:
    """Compile every `AVLayer` of `model` in place and return it. `dynamic`: token counts and
    key lengths symbolic from the first call, so the prefix block, each fill level of the window
    and the steady state share one set of kernels (≈ 15 graphs, not ≈ 60 specialised ones).
    `mode`: a `torch.compile` mode ("max-autotune-no-cudagraphs" tunes the matmuls longer)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across releases
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    _eager_contexts()
    for layer in model.layers:
        layer.compile(mode=mode, dynamic=dynamic)
    return model
