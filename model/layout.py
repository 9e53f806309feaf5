"""Block layout: the one place that decides which latents form which block.

Block 0 is the Global Prefix (V0, A0: each codec's lone first-frame latent). Block k ≥ 1 holds
`video_block` video latents and `audio_block` audio latents = one second (3 + 25 for LTX-2 rates).
A clip of s seconds therefore has 1 + 3s video and 1 + 25s audio latents; nothing is dropped or
padded. Audio sinks are not latents; they belong to block 0 and are handled by the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Block membership for a clip of `seconds` one-second blocks after the prefix."""

    seconds: int
    video_block: int = 3
    audio_block: int = 25

    @classmethod
    def from_counts(cls, n_video: int, n_audio: int, video_block: int = 3, audio_block: int = 25):
        """Layout for given latent counts; a clear error when they do not fit 1+3k / 1+25k."""
        kv, rv = divmod(n_video - 1, video_block)
        ka, ra = divmod(n_audio - 1, audio_block)
        if n_video < 1 or n_audio < 1 or rv or ra or kv != ka:
            raise ValueError(
                f"latent counts do not fit the block layout: got {n_video} video and {n_audio} "
                f"audio latents; expected 1 + {video_block}·k video and 1 + {audio_block}·k audio "
                f"for the same k (e.g. {1 + video_block * max(kv, 0)} and "
                f"{1 + audio_block * max(kv, 0)})"
            )
        return cls(kv, video_block, audio_block)

    @property
    def num_blocks(self) -> int:
        return 1 + self.seconds

    @property
    def num_video(self) -> int:
        return 1 + self.video_block * self.seconds

    @property
    def num_audio(self) -> int:
        return 1 + self.audio_block * self.seconds

    def video_range(self, k: int) -> tuple[int, int]:
        """[start, end) of block k's video latents."""
        self._check(k)
        if k == 0:
            return 0, 1
        return 1 + self.video_block * (k - 1), 1 + self.video_block * k

    def audio_range(self, k: int) -> tuple[int, int]:
        """[start, end) of block k's audio latents (sinks excluded)."""
        self._check(k)
        if k == 0:
            return 0, 1
        return 1 + self.audio_block * (k - 1), 1 + self.audio_block * k

    def video_block_ids(self) -> torch.Tensor:
        """[num_video] block index of every video latent frame."""
        f = torch.arange(self.num_video)
        return torch.where(f == 0, 0, 1 + (f - 1) // self.video_block)

    def audio_block_ids(self) -> torch.Tensor:
        """[num_audio] block index of every audio latent."""
        f = torch.arange(self.num_audio)
        return torch.where(f == 0, 0, 1 + (f - 1) // self.audio_block)

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_blocks:
            raise IndexError(f"block {k} out of range for a layout of {self.num_blocks} blocks")
