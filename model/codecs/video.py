"""`CellVideoCodec`: the embedded video codec (part of `model.codecs`, which re-exports it).

Latent [1 + k, g, g, 6] per clip of 1 + 8k frames: mean RGB of each cell over an 8-frame group
plus 3 temporal DCT-II coefficients of cell luminance. Decoded linearly, or, when the codec
carries a fitted `CellDrawer` (model.codecs.drawer), drawn: the linear decode plus the drawer's
learned correction, which puts back the crisp balls the cell means blur. A drawer with context
also reads the latent before each one: the codec then has `context_latents` = 1, and a chunk
decoded after `start` > 0 takes the last latent of the chunk before it as `context`
(model.streaming.ChunkDecoder passes it), so chunked decode equals whole-clip decode. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from .drawer import CellDrawer
from .norm import _load_norm, _Stats

LUMA = (0.299, 0.587, 0.114)
N_DCT = 3  # temporal DCT-II coefficients k = 1..3 kept per group


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
        drawer: CellDrawer | None = None,
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
        self.drawer = drawer.eval().requires_grad_(False) if drawer is not None else None
        # Latents before a chunk that its decode reads (0: each latent is decoded alone).
        self.context_latents = drawer.context if drawer is not None else 0

    def config(self) -> dict[str, Any]:
        cfg = {
            "type": "CellVideoCodec",
            "height": self.height,
            "width": self.width,
            "grid": self.grid,
            "blur_sigma": self.blur_sigma,
            "fitted": self.fitted,
        }
        if self.drawer is not None:
            cfg["drawer"] = dict(self.drawer.spec)
        return cfg

    def state(self) -> dict[str, torch.Tensor]:
        out = {"mean": self.mean.clone(), "std": self.std.clone()}
        if self.drawer is not None:
            out |= {f"drawer.{k}": v.clone() for k, v in self.drawer.state_dict().items()}
        return out

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> CellVideoCodec:
        kw = {k: config[k] for k in ("height", "width", "grid", "blur_sigma")}
        norm = {k: v for k, v in state.items() if not k.startswith("drawer.")}
        mean, std = _load_norm(norm, cls.latent_channels, "CellVideoCodec")
        drawer = None
        if "drawer" in config:  # bundles from before the drawer have none: linear decode
            drawer = _load_drawer(config["drawer"], state)
        return cls(
            **kw,
            mean=mean if config.get("fitted", True) else None,
            std=std if config.get("fitted", True) else None,
            drawer=drawer,
        )

    def with_drawer(self, drawer: CellDrawer | None) -> CellVideoCodec:
        """The same codec (same standardisation) decoding through `drawer` (None: linear)."""
        mean, std = (self.mean, self.std) if self.fitted else (None, None)
        return CellVideoCodec(
            self.height, self.width, self.grid, self.blur_sigma, mean, std, drawer
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

    def encode_groups(self, x: torch.Tensor, lone: torch.Tensor) -> torch.Tensor:
        """Differentiable `encode` of float frames [N, 8, H, W, 3] in [0, 1], one 8-frame group
        each (lone [N] bool: only frame 0 counts, DCT channels zero) → standardised [N, g, g, 6].
        What a decode must give back to be a right inverse of the encoder (drawer fitting)."""
        n, g = x.shape[0], self.grid
        cells = x.reshape(n, 8, g, self.height // g, g, self.width // g, 3).mean((3, 5))
        cells = torch.einsum("ij,nfjkc,lk->nfilc", self._blur, cells, self._blur)  # [N,8,g,g,3]
        one = lone[:, None, None, None]
        means = torch.where(one, cells[:, 0], cells.mean(1))
        dct = torch.einsum("jk,njab->nabk", self._basis, cells @ self._luma)
        raw = torch.cat([means, torch.where(one, torch.zeros_like(dct), dct)], -1)
        return (raw - self.mean) / self.std

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

    def linear_frames(self, z: torch.Tensor, lone: bool) -> torch.Tensor:
        """One standardised latent [g, g, 6] → float frames [8, H, W, 3] of the linear decode
        (a lone first latent's one frame repeated 8 times: the drawer's fixed output shape)."""
        cells = self._decode_one(z * self.std + self.mean, lone)
        img = F.interpolate(
            cells.permute(0, 3, 1, 2),
            size=(self.height, self.width),
            mode="bilinear",
            align_corners=False,
        ).permute(0, 2, 3, 1)
        return img.expand(8, -1, -1, -1) if lone else img

    @torch.no_grad()
    def _frames(
        self, z: torch.Tensor, lone: bool, prev: torch.Tensor | None, prev_lone: bool
    ) -> torch.Tensor:
        """One standardised latent (and the one before it, or None) → uint8 [1 or 8, H, W, 3]."""
        x = self.linear_frames(z, lone)
        if self.drawer is not None:
            has = prev is not None
            before = (prev if has else torch.zeros_like(z))[None]
            flags = torch.tensor([[lone], [has], [has and prev_lone]])  # [3, 1]
            x = x + self.drawer(z[None], flags[0], before, flags[1], flags[2])[0]
        x = x[:1] if lone else x
        return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

    def decode(
        self, latents: torch.Tensor, start: int = 0, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float [n, g, g, 6] -> uint8 [F', H, W, 3]; F' = 1 + 8(n - 1) if start == 0 else 8n.

        `context` [m, g, g, 6]: the latents just before `start` (most recent last); a drawer with
        context reads the last of them for the chunk's first latent (without it that latent is
        drawn as if nothing came before). Ignored at start 0 and by the linear decode."""
        lat = torch.as_tensor(latents).float()
        g = self.grid
        if lat.ndim != 4 or tuple(lat.shape[1:]) != (g, g, self.latent_channels):
            raise ValueError(
                f"video latents must be [n, {g}, {g}, {self.latent_channels}], "
                f"got {tuple(lat.shape)}"
            )
        prev: list[torch.Tensor | None] = [None] * lat.shape[0]
        if self.context_latents:
            if start > 0 and context is not None and len(context):
                prev[0] = torch.as_tensor(context)[-1].float()
            prev[1:] = list(lat[:-1])
        out = [
            self._frames(lat[i], start + i == 0, prev[i], start + i == 1)
            for i in range(lat.shape[0])
        ]
        if not out:
            return torch.zeros(0, self.height, self.width, 3, dtype=torch.uint8)
        return torch.cat(out, 0)


def _load_drawer(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> CellDrawer:
    """The drawer a codec config names, with exactly its tensors (missing/extra keys named)."""
    try:
        drawer = CellDrawer(**spec)
    except TypeError as err:
        raise ValueError(f"CellVideoCodec config 'drawer' {spec!r}: {err}") from None
    weights = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("drawer.")}
    want = drawer.state_dict()
    missing, unexpected = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"CellVideoCodec drawer tensors: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in want.items():
        if v.shape != weights[k].shape:
            raise ValueError(
                f"CellVideoCodec drawer tensor drawer.{k}: shape {tuple(weights[k].shape)}, "
                f"expected {tuple(v.shape)}"
            )
    drawer.load_state_dict({k: v.float() for k, v in weights.items()})
    return drawer
