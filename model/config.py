"""Model configuration: one frozen dataclass and the named presets (`tiny`, `demo`, `ltx2`).

Holds geometry (pixels, rates, latent grid) and network sizes. It does not hold training settings;
those live in `pipeline/config.py`. Unknown keys in `from_dict` are errors, never warnings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StreamConfig:
    """Sizes of one modality's stream."""

    width: int  # hidden size of the stream
    heads: int  # attention heads of the stream's self/text attention
    latent_channels: int  # channels of one latent position (codec output)
    patch: int = 1  # video only: latent cells per token side (patch × patch cells → one token)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"head dim {self.width // self.heads} must be even (RoPE pairs)")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's shapes and the physical clock of its positions."""

    name: str
    video: StreamConfig
    audio: StreamConfig
    layers: int
    ffn_mult: int = 4
    text_dim: int = 64  # width of the text encoder's features (LTX-2: Gemma 3840)
    causal: bool = False  # True: block-causal student with audio sinks; False: bidirectional
    num_sinks: int = 16  # learnable audio sink tokens (used only when causal)
    input_skip: bool = False  # gated linear input→output skip per stream (helps wide tokens)
    # Training-forward masks: "sdpa" = dense bool masks; "flex" = FlexAttention block masks
    # (compiled on CUDA, where skipping fully-masked tiles pays off at LTX-2 token counts).
    attention: str = "sdpa"
    # Physical geometry (LTX-2 semantics).
    fps: int = 24
    height: int = 64
    width: int = 64
    video_latent_hw: tuple[int, int] = (8, 8)  # latent grid (h, w)
    video_temporal_factor: int = 8  # pixel frames per latent frame (after the first)
    audio_latents_per_s: int = 25
    sample_rate: int = 16000
    audio_channels: int = 1
    video_block_latents: int = 3  # 3 video latents = 24 frames = 1 s
    audio_block_latents: int = 25  # 25 audio latents = 1 s
    rope_theta: float = 10000.0
    rope_max_seconds: float = 20.0  # RoPE horizon (LTX-2: 20 s)
    rope_max_pixels: float = 2048.0
    # Architecture: "omniforcing" (our DiT: physical RoPE per head, MLP timestep tables, optional
    # input skip) or "ltx2" (LTX-2.0's transformer exactly, as diffusers' LTX2VideoTransformer3DModel
    # computes it: AdaLayerNormSingle modulation, PixArt caption projections, RoPE over the whole
    # inner dim from LTX-2's float32 coordinates). With "ltx2", `text_dim` is the width of
    # [video text features | audio text features] (two halves, one per caption projection).
    arch: str = "omniforcing"
    # ltx2 arch only (LTX-2.0 values): mel hop in samples (audio RoPE coordinates), the causal
    # VAEs' first-latent offset, and the cross-modal gate's timestep scale relative to σ·1000
    # (diffusers' cross_attn_timestep_scale_multiplier / timestep_scale_multiplier).
    audio_hop_length: int = 160
    rope_causal_offset: int = 1
    cross_gate_timestep_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried with the config

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"model.attention: {self.attention!r} is not 'sdpa' or 'flex'")
        if self.arch not in ("omniforcing", "ltx2"):
            raise ValueError(f"model.arch: {self.arch!r} is not 'omniforcing' or 'ltx2'")
        if self.arch == "ltx2":
            self._check_ltx2()
        h, w = self.video_latent_hw
        p = self.video.patch
        if h % p or w % p:
            raise ValueError(f"video_latent_hw {self.video_latent_hw} not divisible by patch {p}")
        if self.height % h or self.width % w:
            raise ValueError(
                f"frame {self.height}x{self.width} not divisible by latent grid {self.video_latent_hw}"
            )
        if self.audio.width % 2 or self.audio.width // self.audio.heads % 2:
            raise ValueError("cross-modal attention uses the audio head geometry; it must be even")

    def _check_ltx2(self) -> None:
        """What LTX-2.0's transformer fixes: token = one latent cell, no skip, two text halves,
        whole mel frames per audio latent."""
        if self.video.patch != 1 or self.input_skip:
            raise ValueError("model.arch 'ltx2' needs video.patch 1 and input_skip false")
        if self.text_dim % 2:
            raise ValueError(f"model.arch 'ltx2': text_dim {self.text_dim} must be even")
        hop = self.audio_hop_length * self.audio_latents_per_s
        if self.sample_rate % hop:
            raise ValueError(
                f"model.arch 'ltx2': sample_rate {self.sample_rate} is not a whole number of mel "
                f"hops ({self.audio_hop_length}) per audio latent ({self.audio_latents_per_s}/s)"
            )

    @property
    def audio_mel_per_latent(self) -> int:
        """Mel frames per audio latent (LTX-2: 16000 / 160 / 25 = 4)."""
        return self.sample_rate // (self.audio_hop_length * self.audio_latents_per_s)

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def video_tokens_per_frame(self) -> int:
        h, w = self.video_latent_hw
        return (h // self.video.patch) * (w // self.video.patch)

    @property
    def video_token_dim(self) -> int:
        return self.video.patch * self.video.patch * self.video.latent_channels

    @property
    def pixels_per_cell(self) -> tuple[float, float]:
        h, w = self.video_latent_hw
        return self.height / h, self.width / w

    @property
    def sinks(self) -> int:
        """Number of sink tokens actually in the sequence (0 for bidirectional models)."""
        return self.num_sinks if self.causal else 0

    def frames_for(self, seconds: int) -> int:
        """Pixel frames of a clip of `seconds` one-second blocks plus the prefix: 1 + 24·s."""
        return 1 + self.fps * seconds

    def samples_for(self, seconds: int) -> int:
        """Audio samples matching `frames_for(seconds)`: one latent window more than s seconds."""
        return (seconds * self.audio_latents_per_s + 1) * self.samples_per_audio_latent

    @property
    def samples_per_audio_latent(self) -> int:
        return self.sample_rate // self.audio_latents_per_s

    # ---- (de)serialisation -------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["video_latent_hw"] = list(self.video_latent_hw)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        _reject_unknown(d, cls, "model")
        for key in ("video", "audio"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"model.{key}: expected a mapping, got {d.get(key)!r}")
            _reject_unknown(d[key], StreamConfig, f"model.{key}")
            d[key] = StreamConfig(**d[key])
        if "video_latent_hw" in d:
            d["video_latent_hw"] = tuple(d["video_latent_hw"])
        return cls(**d)


def _reject_unknown(d: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _tiny() -> ModelConfig:
    # CPU unit tests: 2 layers, 2 heads, 4 video tokens per latent frame of 24 dims.
    return ModelConfig(
        name="tiny",
        video=StreamConfig(width=32, heads=2, latent_channels=6, patch=2),
        audio=StreamConfig(width=32, heads=2, latent_channels=16),
        layers=2,
        ffn_mult=2,
        text_dim=32,
        num_sinks=4,
        height=32,
        width=32,
        video_latent_hw=(4, 4),
    )


def _demo() -> ModelConfig:
    # Embedded default (cpu-feasibility run F): one 384-d token per latent frame, gated skip.
    return ModelConfig(
        name="demo",
        video=StreamConfig(width=128, heads=4, latent_channels=6, patch=8),
        audio=StreamConfig(width=128, heads=4, latent_channels=16),
        layers=4,
        ffn_mult=4,
        text_dim=64,
        num_sinks=16,
        input_skip=True,
        height=64,
        width=64,
        video_latent_hw=(8, 8),
    )


def _ltx2() -> ModelConfig:
    # LTX-2.0's transformer (arch "ltx2", = diffusers' LTX2VideoTransformer3DModel defaults): 48
    # layers, video 4096 = 32×128, audio 2048 = 32×64, 128 latent channels each, 512×768 frames →
    # 16×24 latent grid (spatial ×32); text = the two 3840-wide connector outputs over Gemma 3.
    return ModelConfig(
        name="ltx2",
        video=StreamConfig(width=4096, heads=32, latent_channels=128, patch=1),
        audio=StreamConfig(width=2048, heads=32, latent_channels=128),
        layers=48,
        ffn_mult=4,
        text_dim=2 * 3840,
        arch="ltx2",
        num_sinks=16,
        height=512,
        width=768,
        video_latent_hw=(16, 24),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "ltx2": _ltx2}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with field overrides (`preset("tiny", causal=True)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
