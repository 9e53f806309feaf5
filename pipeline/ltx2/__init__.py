"""LTX-2.0 from diffusers into our formats: the key map (keymap), our ModelConfig from its
config.json (config), the shard-by-shard importer (importer) and `omniforcing import ltx2` (cli);
its VAEs + vocoder as our codecs (codecs, audio) and Gemma 3 + connectors as our text encoder
(text). The network itself is model/ (arch "ltx2"); this package is the only one that knows
diffusers' names.

`register()` (run by `import pipeline`) tells model.bundle where the codec and text-encoder
classes a full LTX-2 bundle names live, without importing diffusers until one is loaded."""

from __future__ import annotations


def _video() -> type:
    from pipeline.ltx2.codecs import LTX2VideoCodec

    return LTX2VideoCodec


def _audio() -> type:
    from pipeline.ltx2.audio import LTX2AudioCodec

    return LTX2AudioCodec


def _text() -> type:
    from pipeline.ltx2.text import LTX2TextEncoder

    return LTX2TextEncoder


def register() -> None:
    """Make LTX-2's codecs and text encoder loadable by `model.bundle.Bundle.from_pretrained`."""
    from model.bundle import register_codec, register_text_encoder

    where = "pipeline.ltx2 (the ltx2 extra: diffusers, transformers, accelerate)"
    register_codec("LTX2VideoCodec", _video, where)
    register_codec("LTX2AudioCodec", _audio, where)
    register_text_encoder("LTX2TextEncoder", _text, where)
