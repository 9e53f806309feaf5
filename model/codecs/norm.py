"""Per-channel standardisation shared by the embedded codecs: streaming statistics to fit it
(`_Stats`, float64 sums over latent rows) and reading it back from a codec's state (`_load_norm`).
Torch only.
"""

from __future__ import annotations

import torch


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
