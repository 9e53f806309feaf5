"""Codec protocols and the embedded default codecs (fitted from data, no downloaded weights).

Holds the `VideoCodec` / `AudioCodec` protocols (docs/contracts.md), `CellVideoCodec` (g x g cell
means + temporal DCT of luminance per 8-frame group), `EnvelopeAudioCodec` (5 ms log-energies +
log band energies per 40 ms window, channel-vocoder decoder), the streaming statistics used to fit
their per-channel standardisation, and `save_codecs` / `load_codecs` (JSON + safetensors).
Deliberately does NOT hold a learned VAE (a real LTX-2 VAE plugs in behind the same protocol) nor
anything about shards or files of clips. Torch only.

Chunk-local decode is exact (bit-identical): every latent is decoded alone by the same code path
with the same shapes, and audio carriers come from an integer-indexed sine table, so
decode(cat(a, b)) == cat(decode(a, 0), decode(b, len(a))).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
LOG_EPS = 1e-8  # floor inside log energies: silence -> log(1e-8) = -18.4
N_DCT = 3  # temporal DCT-II coefficients k = 1..3 kept per group


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


class _Stats:
    """Streaming per-channel mean / std (float64 sums) over rows [N, C]."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.s = torch.zeros(channels, dtype=torch.float64)
        self.ss = torch.zeros(channels, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).double()
        self.n += rows.shape[0]
        self.s += rows.sum(0)
        self.ss += (rows * rows).sum(0)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise ValueError("cannot fit a codec on zero clips: the data iterator was empty")
        mean = self.s / self.n
        std = (self.ss / self.n - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-4)
        return mean.float(), std.float()


def _load_norm(state: dict[str, torch.Tensor], channels: int, who: str) -> tuple:
    for key in ("mean", "std"):
        if key not in state:
            raise ValueError(f"{who} state is missing tensor {key!r}")
        if tuple(state[key].shape) != (channels,):
            raise ValueError(
                f"{who} state[{key!r}] has shape {tuple(state[key].shape)}, expected ({channels},)"
            )
    return state["mean"].float().clone(), state["std"].float().clone()


def _dct_basis(n: int = 8, k: int = N_DCT) -> torch.Tensor:
    """Orthonormal DCT-II rows k = 1..K over n samples, as columns: [n, K]."""
    j = torch.arange(n, dtype=torch.float64)[:, None]
    kk = torch.arange(1, k + 1, dtype=torch.float64)[None, :]
    return (math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * j + 1) * kk / (2 * n))).float()


def _blur_matrix(g: int, sigma: float) -> torch.Tensor:
    """Row-normalised Gaussian over the cell grid (constant maps stay constant at borders)."""
    if sigma <= 0:
        return torch.eye(g)
    i = torch.arange(g, dtype=torch.float64)
    m = torch.exp(-((i[:, None] - i[None, :]) ** 2) / (2.0 * sigma * sigma))
    return (m / m.sum(1, keepdim=True)).float()


class CellVideoCodec:
    """Video latent [1 + k, g, g, 6]: mean RGB of each cell over the 8-frame group + 3 temporal
    DCT-II coefficients of cell luminance; frame 0 alone (RGB only, DCT channels zero).

    The decoder is a right inverse of the (blurred) encoder: per-frame cell maps are the group mean
    plus the DCT luminance residual, added along the cell's own colour (so a red ball brightens in
    red rather than in the luma direction), then bilinearly upsampled to pixels.
    """

    temporal_factor = 8
    latent_channels = 3 + N_DCT

    def __init__(
        self,
        height: int,
        width: int,
        grid: int = 8,
        blur_sigma: float = 1.0,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        if grid < 1 or height % grid or width % grid:
            raise ValueError(
                f"CellVideoCodec: height={height}, width={width} must be multiples of grid={grid}"
            )
        self.height, self.width, self.grid, self.blur_sigma = height, width, grid, blur_sigma
        self.latent_hw = (grid, grid)
        self.fitted = mean is not None
        self.mean = mean if mean is not None else torch.zeros(self.latent_channels)
        self.std = std if std is not None else torch.ones(self.latent_channels)
        self._blur = _blur_matrix(grid, blur_sigma)  # [g, g]
        self._basis = _dct_basis()  # [8, 3]
        self._luma = torch.tensor(LUMA)

    def config(self) -> dict[str, Any]:
        return {
            "type": "CellVideoCodec",
            "height": self.height,
            "width": self.width,
            "grid": self.grid,
            "blur_sigma": self.blur_sigma,
            "fitted": self.fitted,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> CellVideoCodec:
        kw = {k: config[k] for k in ("height", "width", "grid", "blur_sigma")}
        mean, std = _load_norm(state, cls.latent_channels, "CellVideoCodec")
        return cls(
            **kw,
            mean=mean if config.get("fitted", True) else None,
            std=std if config.get("fitted", True) else None,
        )

    def _check_frames(self, frames: torch.Tensor) -> torch.Tensor:
        frames = torch.as_tensor(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be [F, H, W, 3], got {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise ValueError(f"video frames must be uint8, got {frames.dtype}")
        n, h, w = frames.shape[:3]
        if (n - 1) % self.temporal_factor:
            raise ValueError(f"video has {n} frames; expected 1 + 8k frames (e.g. 121 for 5.04 s)")
        if (h, w) != (self.height, self.width):
            raise ValueError(f"video frames are {h}x{w}, codec expects {self.height}x{self.width}")
        return frames

    def _raw(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> un-standardised latent [1 + k, g, g, 6]."""
        frames = self._check_frames(frames)
        n, g = frames.shape[0], self.grid
        x = frames.float() / 255.0
        cells = x.reshape(n, g, self.height // g, g, self.width // g, 3).mean((2, 4))  # [F,g,g,3]
        cells = torch.einsum("ij,fjkc,lk->filc", self._blur, cells, self._blur)
        first = torch.cat([cells[0], torch.zeros(g, g, N_DCT)], -1)[None]  # [1, g, g, 6]
        groups = cells[1:].reshape(-1, 8, g, g, 3)  # [k, 8, g, g, 3]
        luma = groups @ self._luma  # [k, 8, g, g]
        dct = torch.einsum("jn,kjab->kabn", self._basis, luma)  # [k, g, g, 3]
        return torch.cat([first, torch.cat([groups.mean(1), dct], -1)], 0)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, H, W, 3], F = 1 + 8k -> standardised float32 [1 + k, g, g, 6]."""
        return (self._raw(frames) - self.mean) / self.std

    def fit(self, frames_iter: Iterable[torch.Tensor]) -> CellVideoCodec:
        """A new codec whose standardisation is fitted on the given clips' latents."""
        stats = _Stats(self.latent_channels)
        for frames in frames_iter:
            stats.add(self._raw(frames))
        mean, std = stats.finish()
        return CellVideoCodec(self.height, self.width, self.grid, self.blur_sigma, mean, std)

    def _decode_one(self, z: torch.Tensor, lone: bool) -> torch.Tensor:
        """One un-standardised latent [g, g, 6] -> float cell maps [1 or 8, g, g, 3]."""
        m = z[..., :3]
        if lone:
            return m[None]
        dy = torch.einsum("jn,abn->jab", self._basis, z[..., 3:])  # [8, g, g] luma residual
        pos = m.clamp_min(0.0)
        direction = pos / (pos @ self._luma).clamp_min(0.02)[..., None]  # [g, g, 3], luma 1
        return m[None] + dy[..., None] * direction[None]

    def decode(self, latents: torch.Tensor, start: int = 0) -> torch.Tensor:
        """float [n, g, g, 6] -> uint8 [F', H, W, 3]; F' = 1 + 8(n - 1) if start == 0 else 8n."""
        lat = torch.as_tensor(latents).float()
        g = self.grid
        if lat.ndim != 4 or tuple(lat.shape[1:]) != (g, g, self.latent_channels):
            raise ValueError(
                f"video latents must be [n, {g}, {g}, {self.latent_channels}], "
                f"got {tuple(lat.shape)}"
            )
        out = []
        for i in range(lat.shape[0]):
            cells = self._decode_one(lat[i] * self.std + self.mean, start == 0 and i == 0)
            img = F.interpolate(
                cells.permute(0, 3, 1, 2),
                size=(self.height, self.width),
                mode="bilinear",
                align_corners=False,
            )
            out.append((img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1))
        if not out:
            return torch.zeros(0, self.height, self.width, 3, dtype=torch.uint8)
        return torch.cat(out, 0)


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
