"""LTX-2's audio VAE + vocoder as our `AudioCodec` (model/codecs protocol), on diffusers' classes.

Shapes (LTX-2.0: 16 kHz, mel hop 160, 64 mel bins, 8 latent channels, ÷4 in time and mel):
- encode: wave float [channels, S] → log-mel [1, 2, T, 64] → audio VAE (causal in time, the
  posterior's mode) → [1, 8, n, 16] → packed and normalised exactly as `LTX2Pipeline` does
  (`_pack_audio_latents`, `_normalize_audio_latents`: [n, 8·16 = 128]), n = S // 640 = 25/s, from
  the first T = 1 + 4(n − 1) mel frames (LTX-2's latent k covers mel frames [4k − 3, 4k + 1)).
- decode: [n, 128] → audio VAE → mel [1, 2, 1 + 4(n − 1), 64] → vocoder (24 kHz for LTX-2.0) →
  resampled to `sample_rate` with diffusers' own anti-aliased `UpSample1d`/`DownSample1d`
  (24 → 48 → 16 kHz) → float [2, S']: S' = 160 + 640(n − 1) at start 0 (the prefix latent is one
  mel frame, 10 ms), 640n after, so a one-second chunk is exactly 16000 samples.
diffusers ships no waveform → mel front end (its pipelines never encode audio): `log_mel` is the
one piece written here, LTX-2's recipe (torch.stft, Hann, centred, magnitude, Slaney mel filters
from transformers' `mel_filter_bank`, log clamped at 1e-5).

Chunk-local decode: the audio VAE is causal in time, the vocoder and the resampler are not; a
chunk is decoded behind `context` (the latents before it) and only its own samples are kept,
which leaves the vocoder's look-ahead across the chunk's end as the drift (docs/operations.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.ltx2.codecs import _context, _diffusers_config, build_module

_VOCODERS = ("LTX2Vocoder", "LTX2VocoderWithBWE")


class LTX2AudioCodec:
    """LTX-2's audio VAE + vocoder behind our `AudioCodec` protocol (see module docstring)."""

    def __init__(
        self,
        vae: Any,
        vocoder: Any,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        context_latents: int = 25,
        lookahead_latents: int = 0,
    ) -> None:
        from diffusers.pipelines.ltx2.vocoder import DownSample1d, UpSample1d
        from transformers.audio_utils import mel_filter_bank

        c = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.vocoder = vocoder.eval().requires_grad_(False)
        self.sample_rate, self.n_fft = int(sample_rate), int(n_fft)
        self.context_latents = int(context_latents)
        self.lookahead_latents = int(lookahead_latents)  # held back while streaming
        self.hop, self.mel_bins, self.factor = c.mel_hop_length, c.mel_bins, 4
        if c.sample_rate != sample_rate or sample_rate % (self.hop * self.factor):
            raise ValueError(
                f"LTX-2 audio VAE: sample_rate {c.sample_rate} with hop {self.hop} does not give "
                f"whole latents per second at {sample_rate} Hz"
            )
        self.latents_per_second = sample_rate // (self.hop * self.factor)  # 25
        self.latent_mel_bins = self.mel_bins // self.factor
        self.latent_channels = c.latent_channels * self.latent_mel_bins  # 128 for LTX-2.0
        self.in_channels = c.in_channels
        basis = mel_filter_bank(
            n_fft // 2 + 1, self.mel_bins, 0.0, sample_rate / 2, sample_rate, "slaney", "slaney"
        )
        self._mel_basis = torch.from_numpy(basis).float().T.contiguous()  # [mels, freqs]
        rate = int(vocoder.config.output_sampling_rate)
        g = math.gcd(rate, sample_rate)
        up, down = sample_rate // g, rate // g
        self._up = UpSample1d(up, window_type="hann", persistent=False) if up > 1 else None
        self._down = DownSample1d(down, persistent=False) if down > 1 else None
        self.vocoder_rate = rate

    def config(self) -> dict[str, Any]:
        return {
            "vae": _diffusers_config(self.vae),
            "vocoder": _diffusers_config(self.vocoder),
            "vocoder_class": type(self.vocoder).__name__,
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "context_latents": self.context_latents,
            "lookahead_latents": self.lookahead_latents,
        }

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        return out | {f"vocoder.{k}": v for k, v in self.vocoder.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> LTX2AudioCodec:
        from diffusers import AutoencoderKLLTX2Audio
        from diffusers.pipelines.ltx2 import vocoder as vocoders

        name = config["vocoder_class"]
        if name not in _VOCODERS:
            raise ValueError(f"codecs.audio: vocoder_class {name!r} is not one of {_VOCODERS}")
        part = {
            p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")}
            for p in ("vae", "vocoder")
        }
        vae = build_module(AutoencoderKLLTX2Audio, config["vae"], part["vae"])
        voc = build_module(getattr(vocoders, name), config["vocoder"], part["vocoder"])
        return cls(
            vae,
            voc,
            config["sample_rate"],
            config["n_fft"],
            config["context_latents"],
            config.get("lookahead_latents", 0),  # bundles imported before it: none
        )

    def to(self, device: Any = None, dtype: Any = None) -> LTX2AudioCodec:
        self.vae.to(device=device, dtype=dtype)
        self.vocoder.to(device=device, dtype=dtype)
        return self

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """float [channels, S] → log-mel [channels, S // hop + 1, mel_bins] (LTX-2's front end)."""
        window = torch.hann_window(self.n_fft, dtype=torch.float32)
        spec = torch.stft(
            wave.float(),
            self.n_fft,
            self.hop,
            self.n_fft,
            window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()  # [channels, freqs, frames]
        mel = torch.einsum("mf,cft->ctm", self._mel_basis, spec)
        return torch.log(mel.clamp(min=1e-5))

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """float [channels, S] → float32 [S // 640, 128] (LTX-2's normalised, packed latents)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

        wave = torch.as_tensor(wave).float()
        window = self.hop * self.factor
        if wave.ndim != 2 or wave.shape[1] < window:
            raise ValueError(
                f"audio must be [channels, ≥ {window} samples], got {tuple(wave.shape)}"
            )
        if wave.shape[0] != self.in_channels:  # LTX-2 is stereo: mono is duplicated, else mixed
            wave = wave.mean(0, keepdim=True).expand(self.in_channels, -1)
        n = wave.shape[1] // window
        mel = self.log_mel(wave)[:, : 1 + self.factor * (n - 1)][None]  # [1, ch, T, mels]
        p = next(self.vae.parameters())
        z = self.vae.encode(mel.to(p.device, p.dtype)).latent_dist.mode().float()
        z = LTX2Pipeline._pack_audio_latents(z)  # [1, n, C·M]
        z = LTX2Pipeline._normalize_audio_latents(z, self.vae.latents_mean, self.vae.latents_std)
        return z[0].cpu().contiguous()

    def _resample(self, wave: torch.Tensor) -> torch.Tensor:
        """[1, ch, S] at the vocoder's rate → at `sample_rate` (diffusers' anti-aliased filters)."""
        if self._up is not None:
            wave = self._up(wave)
        if self._down is not None:
            wave = self._down(wave)
        return wave

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        start: int = 0,
        context: torch.Tensor | None = None,
        ahead: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float [n, 128] → float32 [channels, S']: S' = 160 + 640(n − 1) at start 0, else 640n.
        `context`: the latents just before `start`, decoded ahead of the chunk, then dropped;
        `ahead`: the latents just after it, decoded behind it (the vocoder reads ahead), then
        dropped."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

        latents = torch.as_tensor(latents).float()
        if latents.ndim != 2 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"audio latents must be [n, {self.latent_channels}], got {tuple(latents.shape)}"
            )
        ctx = _context(latents, start, context, self.context_latents)
        after = latents[:0] if ahead is None else torch.as_tensor(ahead).float()
        z = torch.cat([ctx, latents, after])[None]  # [1, m + n + a, C·M]
        vae = self.vae
        z = LTX2Pipeline._denormalize_audio_latents(z, vae.latents_mean, vae.latents_std)
        z = LTX2Pipeline._unpack_audio_latents(z, z.shape[1], num_mel_bins=self.latent_mel_bins)
        p = next(vae.parameters())
        mel = vae.decode(z.to(p.device, p.dtype), return_dict=False)[0]  # [1, ch, T, mels]
        frames = mel.shape[2]
        wave = self.vocoder(mel.to(next(self.vocoder.parameters()).dtype)).float().cpu()
        wave = self._resample(
            wave[..., : frames * self.vocoder_rate * self.hop // self.sample_rate]
        )
        end = frames - self.factor * len(after)  # mel frames up to the chunk's end
        keep = end if start == 0 else self.factor * len(latents)
        return wave[0, :, (end - keep) * self.hop : end * self.hop].contiguous()
