"""The network and how it is run: configs, the dual-stream DiT, layout, masks, RoPE, KV cache,
flow-matching maths, codecs, text encoder, bundles and the streaming generator. Imports only torch."""

from .config import ModelConfig, StreamConfig, preset
from .dit import AVDiT
from .kv_cache import KVCache
from .layout import BlockLayout

__all__ = ["AVDiT", "BlockLayout", "KVCache", "ModelConfig", "StreamConfig", "preset"]
