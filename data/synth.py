"""The embedded default dataset: synthetic world clips rendered into shards (`data synth`).

`clip_seed` derives each clip's world seed from (seed, index), so a dataset is the same on every
machine and a clip does not depend on how many were asked for; `synth` renders and writes them
through `ShardWriter` (data/shards.py), mp4 encoding in data/mp4.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from data.shards import ShardWriter


def clip_seed(seed: int, index: int) -> int:
    """Independent per-clip seeds derived from (seed, index), stable across machines."""
    digest = hashlib.sha256(f"omniforcing-synth:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def synth(
    out: str,
    clips: int,
    seconds: float = 5.04,
    shard_size: int = 64,
    seed: int = 0,
    height: int = 64,
    width: int = 64,
    progress: Callable[[int], None] | None = None,
    max_balls: int = 2,
) -> dict[str, Any]:
    """Render `clips` synthetic clips (1..max_balls balls each) into shards; returns the index."""
    from data.mp4 import encode_mp4
    from data.world import render_clip

    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    writer = ShardWriter(out, shard_size)
    for i in range(clips):
        clip = render_clip(
            clip_seed(seed, i), seconds=seconds, height=height, width=width, max_balls=max_balls
        )
        fps, rate = int(clip.meta["fps"]), int(clip.meta["sample_rate"])
        writer.add(f"clip-{i:06d}", encode_mp4(clip.frames, clip.audio, fps, rate), clip.meta)
        if progress is not None:
            progress(i + 1)
    extra = {"synth": {"seed": seed, "clips": clips, "seconds": seconds, "height": height}}
    extra["synth"] |= {"width": width, "max_balls": max_balls}
    return writer.close(extra)
