"""Small random bundles for tests and protocol work (no training, no data needed)."""

from __future__ import annotations

import torch

from .bundle import Bundle
from .codecs import CellVideoCodec, EnvelopeAudioCodec
from .config import preset
from .dit import AVDiT
from .text import WordTextEncoder

TEST_VOCAB = ["a", "ball", "blue", "green", "high", "large", "low", "red", "small", "with"]


def tiny_bundle(seed: int = 0, causal: bool = True, preset_name: str = "tiny") -> Bundle:
    """A randomly initialised bundle of the `tiny` preset (unfitted codecs: identity normalisation)."""
    cfg = preset(preset_name, causal=causal)
    torch.manual_seed(seed)
    model = AVDiT(cfg).eval()
    text = WordTextEncoder(TEST_VOCAB, dim=cfg.text_dim).eval()
    grid = cfg.video_latent_hw[0]
    video = CellVideoCodec(cfg.height, cfg.width, grid=grid)
    audio = EnvelopeAudioCodec(cfg.sample_rate, cfg.audio_latents_per_s, cfg.audio_channels)
    return Bundle(model, video, audio, text)
