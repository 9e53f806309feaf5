"""Block-causal attention masks for the one full-sequence training forward.

Every token carries a block id (block 0 = Global Prefix; audio sinks are block 0). The rule of the
paper's Figure 3 is then one comparison: a query in block q may attend to a key in block k iff
k ≤ q, and, with a rolling window of W blocks, k = 0 or q − k < W. All of the digest's special
cases follow: V0 sees only itself among video; a sink sees all sinks and A0 (and only V0 among
video); every query sees the sinks and A0/V0; no query sees a later block. True = may attend.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout


def block_mask(q_ids: torch.Tensor, k_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[Lq] and [Lk] block ids → bool [Lq, Lk]; `window` = blocks visible incl. the own one."""
    q = q_ids[:, None]
    k = k_ids[None, :]
    allowed = k <= q
    if window is not None:
        if window < 1:
            raise ValueError(f"attention window must be ≥ 1 block, got {window}")
        allowed &= (k == 0) | (q - k < window)
    return allowed


def video_token_ids(layout: BlockLayout, tokens_per_frame: int) -> torch.Tensor:
    """[num_video · tokens_per_frame] block id of every video token (frame-major)."""
    return layout.video_block_ids().repeat_interleave(tokens_per_frame)


def audio_token_ids(layout: BlockLayout, sinks: int) -> torch.Tensor:
    """[sinks + num_audio] block id of every audio token; sinks come first and belong to block 0."""
    return torch.cat([torch.zeros(sinks, dtype=torch.long), layout.audio_block_ids()])


def flex_block_mask(
    q_ids: torch.Tensor, k_ids: torch.Tensor, window: int | None, device: torch.device | None
):
    """The same rule as `block_mask`, as a FlexAttention BlockMask (tiles of 128 × 128)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_ids, k_ids = q_ids.to(device), k_ids.to(device)

    def mask_mod(b, h, qi, ki):
        q, k = q_ids[qi], k_ids[ki]
        allowed = k <= q
        if window is not None:
            allowed = allowed & ((k == 0) | (q - k < window))
        return allowed

    dev = "cpu" if device is None else str(device)
    return create_block_mask(mask_mod, None, None, len(q_ids), len(k_ids), device=dev)


class TrainingMasks:
    """The four masks of one forward: video-self, audio-self, A2V (video→audio), V2A (audio→video).

    `windows` = (video, audio) blocks visible per query (None = all). The key modality's window
    applies: A2V uses the audio window, V2A the video window (modality-independent caches).
    """

    def __init__(
        self,
        layout: BlockLayout,
        tokens_per_frame: int,
        sinks: int,
        windows: tuple[int | None, int | None] = (None, None),
        device: torch.device | None = None,
        backend: str = "sdpa",
    ) -> None:
        vid = video_token_ids(layout, tokens_per_frame)
        aid = audio_token_ids(layout, sinks)
        wv, wa = windows
        pairs = {
            "video_self": (vid, vid, wv),
            "audio_self": (aid, aid, wa),
            "a2v": (vid, aid, wa),
            "v2a": (aid, vid, wv),
        }
        for name, (q, k, w) in pairs.items():
            if backend == "flex":
                setattr(self, name, flex_block_mask(q, k, w, device))
            else:
                setattr(self, name, block_mask(q, k, w).to(device))
