"""Tiny random LTX-2 components in diffusers/transformers format (no download), for the LTX-2
codec, text-encoder and import tests: a pipeline-layout folder like Lightricks/LTX-2's.

The tokenizer is a word-level `tokenizers` model trained here on a few captions and saved by
transformers (tokenizer.json + tokenizer_config.json): Gemma's real sentencepiece vocabulary
cannot be had offline, and the code under test only needs a transformers tokenizer that pads
on the left to a fixed length."""

from __future__ import annotations

from pathlib import Path

import torch

FRAME_HW = (64, 64)  # pixels → 2×2 latents at LTX-2's ×32
LATENT_HW = (2, 2)
MAX_LEN = 16  # tokens (LTX-2: 1024); a multiple of the connectors' registers
WORDS = "a small big red blue green ball bounces off the wall floor left right up down"

VIDEO_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=8,
    block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(16, 32, 64),
    layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    patch_size=4,  # ×4 patches then ×8 in three downsamples = LTX-2's ×32
    encoder_causal=True,
    decoder_causal=False,  # as LTX-2.0 ships
    decoder_spatial_padding_mode="reflect",
    spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)
AUDIO_VAE = dict(  # latents_mean has base_channels entries = latent_channels × mel_bins / 4
    base_channels=8, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=2, mel_bins=16
)
VOCODER = dict(  # 2 × 16 mel inputs; ×240 per mel frame → 24 kHz, as LTX-2.0's
    in_channels=32,
    hidden_channels=16,
    upsample_kernel_sizes=[12, 15, 16],
    upsample_factors=[6, 5, 8],
    resnet_kernel_sizes=[3],
    resnet_dilations=[[1, 3]],
)
CONNECTORS = dict(  # Gemma width 16, 2 layers + embeddings = 3 hidden states
    caption_channels=16,
    text_proj_in_factor=3,
    video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=8,
    video_connector_num_layers=1,
    video_connector_num_learnable_registers=8,
    audio_connector_num_attention_heads=2,
    audio_connector_attention_head_dim=8,
    audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=8,
)
TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=8,
    audio_out_channels=8,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=1,
    caption_channels=16,
)


def _randomise(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Every floating parameter drawn afresh (no neutral initial values), buffers kept."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


def video_vae(seed: int = 0, **changes):
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(seed)
    return AutoencoderKLLTX2Video(**(VIDEO_VAE | changes)).eval()


def audio_vae(seed: int = 0):
    from diffusers import AutoencoderKLLTX2Audio

    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Audio(**AUDIO_VAE).eval()
    with torch.no_grad():  # non-trivial statistics, so normalisation is exercised
        vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape) * 0.1)
        vae.latents_std.copy_(torch.rand(vae.latents_std.shape) + 0.5)
    return vae


def vocoder(seed: int = 0):
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    return LTX2Vocoder(**VOCODER).eval()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=MAX_LEN,
    )


def gemma(seed: int = 0, vocab: int = 32):
    """A tiny Gemma3ForConditionalGeneration (what LTX-2 ships), vision tower included."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=8,
        max_position_embeddings=64,
    )
    vision = SiglipVisionConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=14,
        patch_size=7,
    )
    cfg = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    return _randomise(Gemma3ForConditionalGeneration(cfg), 0.5)


def connectors(seed: int = 0):
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(seed)
    return _randomise(LTX2TextConnectors(**CONNECTORS), 0.3)


def transformer(seed: int = 0):
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return _randomise(LTX2VideoTransformer3DModel(**TRANSFORMER), 0.3)


def pipeline_folder(root: Path, parts: tuple[str, ...] | None = None) -> Path:
    """Save the tiny components as an LTX2Pipeline folder (only `parts`, when given)."""
    build = {
        "transformer": transformer,
        "vae": video_vae,
        "audio_vae": audio_vae,
        "vocoder": vocoder,
        "text_encoder": gemma,
        "tokenizer": tokenizer,
        "connectors": connectors,
    }
    for name, make in build.items():
        if parts is None or name in parts:
            make().save_pretrained(root / name)
    return root
