"""Block layout: counts and membership (Global Prefix + 3 video / 25 audio latents per second)."""

import pytest
import torch

from model import BlockLayout


@pytest.mark.parametrize("seconds,nv,na", [(1, 4, 26), (5, 16, 126), (21, 64, 526)])
def test_counts(seconds, nv, na):
    lay = BlockLayout(seconds)
    assert (lay.num_video, lay.num_audio, lay.num_blocks) == (nv, na, seconds + 1)
    assert BlockLayout.from_counts(nv, na) == lay


@pytest.mark.parametrize("seconds", [1, 5, 21])
def test_membership_partitions_the_clip(seconds):
    lay = BlockLayout(seconds)
    vids, aids = lay.video_block_ids(), lay.audio_block_ids()
    assert lay.video_range(0) == (0, 1) and lay.audio_range(0) == (0, 1)
    for k in range(lay.num_blocks):
        v0, v1 = lay.video_range(k)
        a0, a1 = lay.audio_range(k)
        assert torch.all(vids[v0:v1] == k) and torch.all(aids[a0:a1] == k)
        if k:
            assert (v1 - v0, a1 - a0) == (3, 25)
    assert lay.video_range(seconds)[1] == lay.num_video
    assert lay.audio_range(seconds)[1] == lay.num_audio
    # Block k ≥ 1 covers exactly second k: video frames 1+24(k-1) … 24k, audio latents likewise.
    assert lay.video_range(5 if seconds >= 5 else 1)[0] == 1 + 3 * ((5 if seconds >= 5 else 1) - 1)


@pytest.mark.parametrize("nv,na", [(15, 126), (16, 125), (16, 101), (0, 1), (4, 51)])
def test_counts_that_do_not_fit_name_the_counts(nv, na):
    with pytest.raises(ValueError, match=rf"{nv} video and {na} audio"):
        BlockLayout.from_counts(nv, na)


def test_block_out_of_range():
    with pytest.raises(IndexError):
        BlockLayout(2).video_range(3)
