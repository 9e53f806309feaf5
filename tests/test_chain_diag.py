"""benchmarks/ode_chain_diag's per-block sync: contacts land in the block whose frames hold
them, the blocks pool to the clip-level figure, and silencing one block's audio loses exactly
that block's sync (rendered world clips, real detectors)."""

from __future__ import annotations

import numpy as np

from benchmarks.ode_chain_diag import block_of_time, sync_by_block
from data.world import render_clip
from pipeline.evaluate import EvalClip, evaluate


def test_block_of_time_follows_the_block_layout() -> None:
    # 24 fps, 24 frames per block: frame 0 alone, then frames 1-24, 25-48, ...
    assert [block_of_time(f / 24, 24, 24) for f in (0, 1, 24, 25, 48, 49)] == [0, 1, 1, 2, 2, 3]


def _clips(seeds: range) -> list[EvalClip]:
    out = []
    for s in seeds:
        c = render_clip(s)
        out.append(
            EvalClip(f"c{s}", c.frames, c.audio, {**c.meta, "fps": 24, "sample_rate": 16000})
        )
    return out


def test_blocks_pool_to_the_clip_figure_and_a_silenced_block_loses_its_sync() -> None:
    clips = _clips(range(6))
    per = sync_by_block(clips, 6, 24)
    whole = evaluate(clips)
    total = sum(n for n, _ in per)
    assert total > 10
    pooled = sum(n * r for n, r in per if n) / total
    assert abs(pooled - whole["contact_recall"]) < 1e-9
    # Silence block 2 (frames 25-48: 25/24 s .. 49/24 s) in every clip's audio.
    quiet = []
    for c in clips:
        a = c.audio.copy()
        a[:, int(25 / 24 * 16000) : int(49 / 24 * 16000)] = 0.0
        quiet.append(EvalClip(c.key, c.frames, a, c.meta))
    after = sync_by_block(quiet, 6, 24)
    assert after[2][0] == per[2][0] > 0 and after[2][1] < 0.5 * per[2][1]
    for k in (1, 4, 5):  # blocks away from the silenced one keep their figure
        assert after[k] == per[k] or np.isnan(per[k][1])
