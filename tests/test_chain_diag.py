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


def test_a_first_step_network_changes_only_the_chains_that_take_a_first_step() -> None:
    import torch

    from benchmarks.ode_chain_diag import chain
    from model import BlockLayout
    from model.testing import tiny_bundle

    a, b = tiny_bundle(seed=0), tiny_bundle(seed=1)
    cfg = a.model.cfg
    lay = BlockLayout(2, cfg.video_block_latents, cfg.audio_block_latents)
    fv, fa = lay.video_range(lay.num_blocks - 1)[1], lay.audio_range(lay.num_blocks - 1)[1]
    h, w = cfg.video_latent_hw
    g = torch.Generator().manual_seed(0)
    row = {  # a trajectory row: states at σ 1 / 0.7507 / 0.5448 and the clean end
        "traj_video": torch.randn(4, fv, h, w, cfg.video.latent_channels, generator=g),
        "traj_audio": torch.randn(4, fa, cfg.audio.latent_channels, generator=g),
        "caption": "a red ball",
    }

    def same(x: tuple[torch.Tensor, ...], y: tuple[torch.Tensor, ...]) -> bool:
        return all(torch.equal(p, q) for p, q in zip(x, y, strict=True))

    with torch.no_grad():
        for mode in ("own", "jump@0"):
            plain = chain(a, row, mode, 7)
            assert same(plain, chain(a, row, mode, 7, a))
            assert not torch.allclose(plain[0], chain(a, row, mode, 7, b)[0])
        # Starting from the teacher's state at σ index 1, no chain takes a first step.
        assert same(chain(a, row, "chain@1", 7), chain(a, row, "chain@1", 7, b))
