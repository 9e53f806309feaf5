"""Codec protocols and the embedded default codecs (fitted from data, no downloaded weights).

Holds the `VideoCodec` / `AudioCodec` protocols (docs/contracts.md), the codecs' type table, fitting
both codecs in one pass (`fit_codecs`) and `save_codecs` / `load_codecs` (JSON + safetensors). The
codecs themselves live beside it: `CellVideoCodec` (g x g cell means + temporal DCT of luminance
per 8-frame group) in `video`, `EnvelopeAudioCodec` (5 ms log-energies + log band energies per
40 ms window, channel-vocoder decoder) in `audio`, and the streaming statistics that fit their
per-channel standardisation in `norm`; every public name is importable from `model.codecs`.
Deliberately does NOT hold a learned VAE (a real LTX-2 VAE plugs in behind the same protocol) nor
anything about shards or files of clips. Torch only.

Chunk-local decode is exact (bit-identical): every latent is decoded alone by the same code path
with the same shapes, and audio carriers come from an integer-indexed sine table, so
decode(cat(a, b)) == cat(decode(a, 0), decode(b, len(a))); a video codec whose drawer reads the
previous latent (`context_latents` 1) takes it as `context`: decode(b, len(a), context=a).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from .audio import LOG_EPS, EnvelopeAudioCodec
from .norm import _Stats
from .video import LUMA, N_DCT, CellVideoCodec

__all__ = [
    "LOG_EPS",
    "LUMA",
    "N_DCT",
    "AudioCodec",
    "CellVideoCodec",
    "EnvelopeAudioCodec",
    "VideoCodec",
    "fit_codecs",
    "load_codecs",
    "save_codecs",
]


class VideoCodec(Protocol):
    latent_channels: int
    latent_hw: tuple[int, int]
    temporal_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor: ...
    def config(self) -> dict[str, Any]: ...
    def state(self) -> dict[str, torch.Tensor]: ...


class AudioCodec(Protocol):
    latent_channels: int
    latents_per_second: int
    sample_rate: int

    def encode(self, wave: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor: ...
    def config(self) -> dict[str, Any]: ...
    def state(self) -> dict[str, torch.Tensor]: ...


_CODECS = {"CellVideoCodec": CellVideoCodec, "EnvelopeAudioCodec": EnvelopeAudioCodec}


def fit_codecs(
    clips: Iterable[tuple[Any, Any]],
    grid: int = 8,
    blur_sigma: float = 1.0,
    sample_rate: int = 16000,
) -> tuple[CellVideoCodec, EnvelopeAudioCodec]:
    """Fit both codecs in one pass over (frames uint8 [F,H,W,3], audio [C,S]) pairs."""
    video = audio = None
    vstats, astats = _Stats(CellVideoCodec.latent_channels), None
    for frames, wave in clips:
        frames, wave = torch.as_tensor(frames), torch.as_tensor(wave)
        if video is None:
            video = CellVideoCodec(frames.shape[1], frames.shape[2], grid, blur_sigma)
            audio = EnvelopeAudioCodec(sample_rate, channels=wave.shape[0])
            astats = _Stats(audio.latent_channels)
        vstats.add(video._raw(frames))
        astats.add(audio._raw(wave))
    if video is None:
        raise ValueError("fit_codecs got no clips: the iterable was empty")
    vm, vs = vstats.finish()
    am, as_ = astats.finish()
    cfg = audio.config()
    del cfg["type"], cfg["fitted"]
    return (
        CellVideoCodec(video.height, video.width, grid, blur_sigma, vm, vs),
        EnvelopeAudioCodec(**cfg, mean=am, std=as_),
    )


def save_codecs(directory: str | os.PathLike, video: VideoCodec, audio: AudioCodec) -> None:
    """Write codec.json + codec.safetensors (each atomically: temp name, then rename)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"video.{k}": v.contiguous() for k, v in video.state().items()}
    tensors |= {f"audio.{k}": v.contiguous() for k, v in audio.state().items()}
    tmp = d / ".codec.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, d / "codec.safetensors")
    tmp = d / ".codec.json.tmp"
    tmp.write_text(json.dumps({"video": video.config(), "audio": audio.config()}, indent=2))
    os.replace(tmp, d / "codec.json")


def load_codecs(directory: str | os.PathLike) -> tuple[Any, Any]:
    """Read what `save_codecs` wrote -> (video codec, audio codec)."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in ("codec.json", "codec.safetensors"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"codec file missing: {d / name}")
    cfg = json.loads((d / "codec.json").read_text())
    tensors = load_file(str(d / "codec.safetensors"))
    out = []
    for part in ("video", "audio"):
        if part not in cfg or cfg[part].get("type") not in _CODECS:
            raise ValueError(f"{d / 'codec.json'}: key {part!r} missing or has unknown 'type'")
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(part + ".")}
        out.append(_CODECS[cfg[part]["type"]].from_state(cfg[part], state))
    return out[0], out[1]
