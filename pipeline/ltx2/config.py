"""Our ModelConfig (arch "ltx2") from a diffusers `LTX2VideoTransformer3DModel` config.json.

Refuses, naming each option, every switch our ltx2 arch does not compute (LTX-2.3/2.5 additions,
other norms, RoPE types or patch sizes). Needs no diffusers install: its defaults (0.42.1) are
written out here for keys an older config.json omits (tests/test_ltx2.py checks them).
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, StreamConfig

# diffusers' constructor defaults = LTX-2.0's transformer.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "vae_scale_factors": (8, 32, 32),
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    "gated_attn": False,
    "cross_attn_mod": False,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "audio_gated_attn": False,
    "audio_cross_attn_mod": False,
    "num_layers": 48,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "caption_channels": 3840,
    "attention_bias": True,
    "attention_out_bias": True,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,
    "rope_type": "interleaved",
    "use_prompt_embeddings": True,
    "perturbed_attn": False,
    "ff_bias": True,
    "audio_ff_bias": True,
    "use_prompt_adaln_single": True,  # only read with cross_attn_mod (LTX-2.3), which we refuse
    "use_keyframes_abs_pos_embedding": False,
}
# Options our ltx2 arch computes only at LTX-2.0's value.
_FIXED = (
    "patch_size",
    "patch_size_t",
    "audio_patch_size",
    "audio_patch_size_t",
    "gated_attn",
    "cross_attn_mod",
    "audio_gated_attn",
    "audio_cross_attn_mod",
    "activation_fn",
    "qk_norm",
    "norm_elementwise_affine",
    "norm_eps",
    "attention_bias",
    "attention_out_bias",
    "rope_double_precision",
    "rope_type",
    "timestep_scale_multiplier",
    "use_prompt_embeddings",
    "perturbed_attn",
    "ff_bias",
    "audio_ff_bias",
    "use_keyframes_abs_pos_embedding",
)


def model_config_from_diffusers(
    config: dict[str, Any],
    *,
    name: str = "ltx2",
    latent_hw: tuple[int, int] = (16, 24),
    causal: bool = False,
    num_sinks: int = 16,
) -> ModelConfig:
    """Our ModelConfig for a diffusers transformer config (the parsed config.json).

    diffusers' config fixes no frame size: `latent_hw` is the latent grid we train and sample at
    (LTX-2: 512×768 frames = 16×24 latents at its ×32 spatial factor)."""
    c = DIFFUSERS_DEFAULTS | {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(c) - set(DIFFUSERS_DEFAULTS))
    fixed = {k: DIFFUSERS_DEFAULTS[k] for k in _FIXED}
    bad = [f"{k}={c[k]!r} (need {v!r})" for k, v in fixed.items() if c[k] != v]
    bad += [f"{k} (not an LTX-2.0 option)" for k in unknown]
    vw = c["num_attention_heads"] * c["attention_head_dim"]
    aw = c["audio_num_attention_heads"] * c["audio_attention_head_dim"]
    scale = tuple(c["vae_scale_factors"])
    must_equal = {  # option: (its value, the value our arch needs)
        "out_channels": (c["out_channels"] or c["in_channels"], c["in_channels"]),
        "audio_out_channels": (
            c["audio_out_channels"] or c["audio_in_channels"],
            c["audio_in_channels"],
        ),
        "cross_attention_dim": (c["cross_attention_dim"], vw),
        "audio_cross_attention_dim": (c["audio_cross_attention_dim"], aw),
        "base_width": (c["base_width"], c["base_height"]),
        "audio_pos_embed_max_pos": (c["audio_pos_embed_max_pos"], c["pos_embed_max_pos"]),
        "vae_scale_factors[2]": (scale[2], scale[1]),
    }
    bad += [f"{k}={got!r} (need {want!r})" for k, (got, want) in must_equal.items() if got != want]
    sr, hop, m = c["audio_sampling_rate"], c["audio_hop_length"], c["audio_scale_factor"]
    if sr % (hop * m):
        bad.append(f"audio_sampling_rate {sr} is not a whole number of latents of {m}×{hop}")
    if bad:
        raise ValueError("LTX-2 transformer config: unsupported " + "; ".join(bad))
    h, w = latent_hw
    return ModelConfig(
        name=name,
        video=StreamConfig(vw, c["num_attention_heads"], c["in_channels"], patch=1),
        audio=StreamConfig(aw, c["audio_num_attention_heads"], c["audio_in_channels"]),
        layers=c["num_layers"],
        ffn_mult=4,  # diffusers' FeedForward default, which LTX-2 uses
        text_dim=2 * c["caption_channels"],  # [video connector | audio connector] features
        causal=causal,
        num_sinks=num_sinks,
        height=h * scale[1],
        width=w * scale[2],
        video_latent_hw=(h, w),
        video_temporal_factor=scale[0],
        audio_latents_per_s=sr // (hop * m),
        sample_rate=sr,
        rope_theta=float(c["rope_theta"]),
        rope_max_seconds=float(c["pos_embed_max_pos"]),
        rope_max_pixels=float(c["base_height"]),
        arch="ltx2",
        audio_hop_length=hop,
        rope_causal_offset=c["causal_offset"],
        cross_gate_timestep_scale=c["cross_attn_timestep_scale_multiplier"]
        / c["timestep_scale_multiplier"],
    )
