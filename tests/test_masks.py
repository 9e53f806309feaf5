"""Training masks: the entries the digest §5 (paper Figure 3) prescribes."""

import torch

from model import BlockLayout
from model.masks import TrainingMasks, audio_token_ids, block_mask, video_token_ids

S, N = 4, 2  # sinks, video tokens per latent frame


def _masks(seconds=3, windows=(None, None)):
    lay = BlockLayout(seconds)
    return lay, TrainingMasks(lay, N, S, windows)


def test_prefix_and_sink_rules():
    lay, m = _masks()
    v0 = slice(0, N)  # V0's tokens
    # V0 sees only itself among video.
    assert m.video_self[v0].sum(1).eq(N).all() and m.video_self[v0, :N].all()
    # A sink sees all sinks plus A0 among audio, and only V0 among video.
    assert m.audio_self[:S, : S + 1].all() and not m.audio_self[:S, S + 1 :].any()
    assert m.v2a[:S, :N].all() and not m.v2a[:S, N:].any()
    # Every video query sees all sinks and A0 (A2V); every audio query sees sinks, A0 and V0.
    assert m.a2v[:, : S + 1].all()
    assert m.audio_self[:, : S + 1].all()
    assert m.v2a[:, :N].all()
    assert m.video_self[:, :N].all()


def test_no_query_sees_a_later_block():
    lay, m = _masks(seconds=4)
    vid = video_token_ids(lay, N)
    aid = audio_token_ids(lay, S)
    for mask, q, k in [
        (m.video_self, vid, vid),
        (m.audio_self, aid, aid),
        (m.a2v, vid, aid),
        (m.v2a, aid, vid),
    ]:
        later = k[None, :] > q[:, None]
        assert not (mask & later).any()
        # … and inside a block attention is bidirectional across both modalities.
        same = k[None, :] == q[:, None]
        assert mask[same].all()


def test_block_three_video_sees_exactly_its_audio_prefix():
    lay, m = _masks(seconds=4)
    a_end = S + lay.audio_range(3)[1]
    row = N * lay.video_range(3)[0]  # first token of block 3's video
    assert m.a2v[row, :a_end].all() and not m.a2v[row, a_end:].any()


def test_window_keeps_prefix_and_recent_blocks():
    q = torch.tensor([0, 1, 2, 3, 4])
    mask = block_mask(q, q, window=2)
    assert mask[4].tolist() == [True, False, False, True, True]
    assert mask[1].tolist() == [True, True, False, False, False]
