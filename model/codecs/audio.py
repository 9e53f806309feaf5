"""`EnvelopeAudioCodec`: the embedded audio codec (part of `model.codecs`, which re-exports it).

Latent [Fa, 16] at 25/s: 5 ms log-energies + log band energies per 40 ms window; decoded by a
channel vocoder whose carriers come from an integer-indexed sine table (exact chunk-local decode).
Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .norm import _load_norm, _Stats

LOG_EPS = 1e-8  # floor inside log energies: silence -> log(1e-8) = -18.4


class EnvelopeAudioCodec:
    """Audio latent [Fa, 16] at 25/s: 8 sub-window (5 ms) log-energies + 8 log band energies
    (geometric bands 150-3000 Hz, Hann-windowed FFT). Decoder: channel vocoder."""

    def __init__(
        self,
        sample_rate: int = 16000,
        latents_per_second: int = 25,
        channels: int = 1,
        n_sub: int = 8,
        n_bands: int = 8,
        f_lo: float = 150.0,
        f_hi: float = 3000.0,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        if sample_rate % latents_per_second or (sample_rate // latents_per_second) % n_sub:
            raise ValueError(
                f"EnvelopeAudioCodec: sample_rate={sample_rate} must split into "
                f"{latents_per_second} windows/s of {n_sub} equal sub-windows"
            )
        self.sample_rate, self.latents_per_second, self.channels = (
            sample_rate,
            latents_per_second,
            channels,
        )
        self.n_sub, self.n_bands, self.f_lo, self.f_hi = n_sub, n_bands, f_lo, f_hi
        self.latent_channels = n_sub + n_bands
        self.window = sample_rate // latents_per_second  # 640 samples at 16 kHz
        self.fitted = mean is not None
        self.mean = mean if mean is not None else torch.zeros(self.latent_channels)
        self.std = std if std is not None else torch.ones(self.latent_channels)
        self._build_tables()

    def _build_tables(self) -> None:
        w, sr = self.window, self.sample_rate
        self._hann = torch.hann_window(w, periodic=True, dtype=torch.float64)
        edges = torch.logspace(
            math.log10(self.f_lo), math.log10(self.f_hi), self.n_bands + 1, dtype=torch.float64
        )
        freqs = torch.fft.rfftfreq(w, 1.0 / sr, dtype=torch.float64)
        self._band_of_bin = [
            ((freqs >= edges[b]) & (freqs < edges[b + 1])).nonzero().flatten()
            for b in range(self.n_bands)
        ]
        # Integer band centres (geometric) -> exact carrier phase from (f * n) mod sr via a table.
        self._centres = [
            int(round(math.sqrt(edges[b] * edges[b + 1]))) for b in range(self.n_bands)
        ]
        self._sine = torch.sin(2 * math.pi * torch.arange(sr, dtype=torch.float64) / sr).float()
        # Envelope interpolation positions inside one window: sub-window centres, held at edges.
        q = (torch.arange(w, dtype=torch.float64) + 0.5) / (w // self.n_sub) - 0.5
        q = q.clamp(0, self.n_sub - 1)
        self._i0 = q.floor().long().clamp(max=self.n_sub - 2)
        self._frac = (q - self._i0.double()).float()

    def config(self) -> dict[str, Any]:
        return {
            "type": "EnvelopeAudioCodec",
            "sample_rate": self.sample_rate,
            "latents_per_second": self.latents_per_second,
            "channels": self.channels,
            "n_sub": self.n_sub,
            "n_bands": self.n_bands,
            "f_lo": self.f_lo,
            "f_hi": self.f_hi,
            "fitted": self.fitted,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state(
        cls, config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> EnvelopeAudioCodec:
        keys = ("sample_rate", "latents_per_second", "channels", "n_sub", "n_bands", "f_lo", "f_hi")
        kw = {k: config[k] for k in keys}
        mean, std = _load_norm(state, kw["n_sub"] + kw["n_bands"], "EnvelopeAudioCodec")
        fitted = config.get("fitted", True)
        return cls(**kw, mean=mean if fitted else None, std=std if fitted else None)

    def _raw(self, wave: torch.Tensor) -> torch.Tensor:
        """float [C, S] -> un-standardised latent [S / window, 16] (channels mixed to mono)."""
        wave = torch.as_tensor(wave)
        if wave.ndim != 2:
            raise ValueError(f"audio must be [channels, samples], got {tuple(wave.shape)}")
        s, w = wave.shape[1], self.window
        if s % w:
            raise ValueError(
                f"audio has {s} samples; expected a multiple of {w} "
                f"({self.latents_per_second} latents/s at {self.sample_rate} Hz, "
                f"e.g. 80640 for 5.04 s)"
            )
        win = wave.double().mean(0).reshape(-1, w)  # [n, W]
        sub = (win.reshape(win.shape[0], self.n_sub, -1) ** 2).mean(-1)  # [n, 8] mean square
        spec = torch.fft.rfft(win * self._hann).abs() ** 2
        power = 2.0 * spec / (w * (self._hann**2).sum())  # a sine of amplitude A -> ~A^2 / 2
        bands = torch.stack([power[:, idx].sum(-1) for idx in self._band_of_bin], -1)  # [n, 8]
        return torch.log(torch.cat([sub, bands], -1) + LOG_EPS).float()

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """float [channels, S], S a multiple of 640 -> standardised float32 [S / 640, 16]."""
        return (self._raw(wave) - self.mean) / self.std

    def fit(self, waves_iter: Iterable[torch.Tensor]) -> EnvelopeAudioCodec:
        """A new codec whose standardisation is fitted on the given waves' latents."""
        stats = _Stats(self.latent_channels)
        for wave in waves_iter:
            stats.add(self._raw(wave))
        mean, std = stats.finish()
        cfg = self.config()
        del cfg["type"], cfg["fitted"]
        return EnvelopeAudioCodec(**cfg, mean=mean, std=std)

    def _decode_one(self, z: torch.Tensor, index: int) -> torch.Tensor:
        """One un-standardised latent [16] at absolute window `index` -> samples [W]."""
        w, sr = self.window, self.sample_rate
        amp = torch.exp(0.5 * z[: self.n_sub].clamp(max=0.0))  # rms per 5 ms, at most 1
        env = amp[self._i0] * (1 - self._frac) + amp[self._i0 + 1] * self._frac  # [W]
        band = torch.exp(z[self.n_sub :].clamp(min=math.log(LOG_EPS), max=0.0))
        weight = (band / band.sum()).sqrt()  # [8], sum of squares 1 -> carrier rms 1/sqrt(2)
        n_abs = torch.arange(index * w, (index + 1) * w, dtype=torch.int64)
        carrier = torch.zeros(w)
        for b, f in enumerate(self._centres):
            carrier = carrier + weight[b] * self._sine[(n_abs * f) % sr]
        return (math.sqrt(2.0) * env * carrier).clamp(-1.0, 1.0)

    def decode(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
        """float [n, 16] -> float32 [channels, n * 640]; `start` = absolute index of latent 0."""
        lat = torch.as_tensor(latents).float()
        if lat.ndim != 2 or lat.shape[1] != self.latent_channels:
            raise ValueError(
                f"audio latents must be [n, {self.latent_channels}], got {tuple(lat.shape)}"
            )
        parts = [
            self._decode_one(lat[i] * self.std + self.mean, start + i) for i in range(lat.shape[0])
        ]
        mono = torch.cat(parts) if parts else torch.zeros(0)
        return mono[None].repeat(self.channels, 1)
