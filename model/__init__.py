"""The network and how it is run: configs, the dual-stream DiT, layout, masks, RoPE, KV cache,
flow-matching maths, codecs, text encoder, bundles and the streaming generator. Imports only torch
(and safetensors for weights)."""

from . import flow
from .bundle import Bundle, BundleError
from .codecs import AudioCodec, VideoCodec
from .config import ModelConfig, StreamConfig, preset
from .dit import AVDiT
from .kv_cache import KVCache
from .layout import BlockLayout
from .streaming import Chunk, StreamingGenerator, rollout_blocks
from .text import TextEncoder, WordTextEncoder, build_vocab

__all__ = [
    "AVDiT",
    "AudioCodec",
    "BlockLayout",
    "Bundle",
    "BundleError",
    "Chunk",
    "KVCache",
    "ModelConfig",
    "StreamConfig",
    "StreamingGenerator",
    "TextEncoder",
    "VideoCodec",
    "WordTextEncoder",
    "build_vocab",
    "flow",
    "preset",
    "rollout_blocks",
]
