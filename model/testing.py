"""Small random bundles for tests and protocol work (no training, no data needed)."""

from __future__ import annotations

import torch

from .bundle import Bundle
from .codecs import CellVideoCodec, EnvelopeAudioCodec
from .config import ModelConfig, StreamConfig, preset
from .dit import AVDiT
from .text import WordTextEncoder

TEST_VOCAB = ["a", "ball", "blue", "green", "high", "large", "low", "red", "small", "with"]


def tiny_config(arch: str = "omniforcing", causal: bool = True) -> ModelConfig:
    """The `tiny` preset, or its LTX-2-arch twin (one 6-channel token per latent cell: the ltx2
    arch has no patches; 16 + 16 text features for the two caption projections)."""
    cfg = preset("tiny", causal=causal)
    if arch == "ltx2":
        cfg = cfg.replace(arch="ltx2", video=StreamConfig(width=32, heads=2, latent_channels=6))
    return cfg


def tiny_bundle(
    seed: int = 0, causal: bool = True, preset_name: str = "tiny", arch: str = "omniforcing"
) -> Bundle:
    """A randomly initialised bundle of the `tiny` preset (unfitted codecs: identity normalisation);
    `arch="ltx2"`: of `tiny_config("ltx2")`."""
    cfg = tiny_config(arch, causal) if arch != "omniforcing" else preset(preset_name, causal=causal)
    torch.manual_seed(seed)
    model = AVDiT(cfg).eval()
    text = WordTextEncoder(TEST_VOCAB, dim=cfg.text_dim).eval()
    grid = cfg.video_latent_hw[0]
    video = CellVideoCodec(cfg.height, cfg.width, grid=grid)
    audio = EnvelopeAudioCodec(cfg.sample_rate, cfg.audio_latents_per_s, cfg.audio_channels)
    return Bundle(model, video, audio, text)
