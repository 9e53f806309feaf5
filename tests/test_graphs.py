"""`GraphedStream`: the static-buffer streaming path (CUDA graphs on a GPU) gives the plain path's
numbers, however long the clip and whatever came before it; on the CPU its buffers run eagerly."""

import pytest
import torch

from model import flow
from model.graphs import GraphedStream
from model.streaming import StreamingGenerator, rollout_blocks
from model.testing import tiny_bundle

SIGMAS = flow.DEFAULT_STUDENT_SIGMAS


def _latents(view, cache, seconds, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [
            (v.clone(), a.clone()) for _, v, a in rollout_blocks(view, cache, seconds, SIGMAS, g)
        ]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for (v, a), (w, b) in zip(xs, ys, strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_static_path_matches_plain_path_across_evictions_and_prompts():
    b = tiny_bundle(seed=3)
    model, windows = b.model, (2, 2)
    graphed = GraphedStream(model, windows, text_len=b.text_encoder.max_len)
    assert not graphed.capture  # CPU: the same buffers, run eagerly
    runs = [("a red ball", 5, 0), ("a small blue ball with a low pitch", 3, 7), ("", 2, 1)]
    addresses = None
    for prompt, seconds, seed in runs:
        emb, mask = b.text_encoder([prompt])
        plain = _latents(model, model.new_cache(emb, mask, seconds, windows), seconds, seed)
        cache = graphed.reset(emb, mask)
        slots = [s.k.data_ptr() for layer in cache._slots for s in layer.values()]
        addresses = addresses or slots
        assert slots == addresses  # one cache, reused in place by every stream
        _assert_same(_latents(graphed, cache, seconds, seed), plain)
    # Three prompts of different lengths and 5 blocks through a 2-block window: the text padding,
    # the reset and the evictions leave no trace of the stream before.
    first = _latents(graphed, graphed.reset(*b.text_encoder(["a red ball"])), 5, 0)
    emb, mask = b.text_encoder(["a red ball"])
    _assert_same(first, _latents(model, model.new_cache(emb, mask, 5, windows), 5, 0))


def test_generator_with_graphs_gives_the_same_chunks_and_a_busy_one_falls_back():
    b = tiny_bundle(seed=5)
    plain = StreamingGenerator(b, window_s=2)
    graphed = StreamingGenerator(b, window_s=2, graphs=True)
    want = [list(plain.stream(p, 4, seed=s)) for p, s in (("a red ball", 2), ("a green ball", 3))]
    first = graphed.stream("a red ball", 4, seed=2)
    got_first = [next(first)]
    # The graphed stream is taken: a second stream meanwhile runs on the plain path.
    got_second = list(graphed.stream("a green ball", 4, seed=3))
    got_first += list(first)
    for got, ref in ((got_first, want[0]), (got_second, want[1])):
        assert [c.index for c in got] == [c.index for c in ref]
        for c, r in zip(got, ref, strict=True):
            assert (c.frames.int() - r.frames.int()).abs().max() <= 1  # uint8 rounding
            torch.testing.assert_close(c.audio, r.audio, rtol=1e-4, atol=1e-4)
    # The first stream went through the GraphedStream (its cache exists) and released it.
    assert graphed._graphed.cache is not None and graphed._graphed_free.acquire(blocking=False)


def test_block_rope_tables_are_made_once_per_block():
    b = tiny_bundle()
    emb, mask = b.text_encoder(["a ball"])
    cache = b.model.new_cache(emb, mask, 2)
    made = []

    def make():
        made.append(1)
        return object()

    first = cache.block_rope(0, make)
    assert cache.block_rope(0, make) is first and len(made) == 1
    cache.block_rope(1, make)
    assert len(made) == 2


def test_bad_uses_are_refused_with_what_is_wrong():
    b = tiny_bundle()
    with pytest.raises(ValueError, match="rolling window"):
        GraphedStream(b.model, (None, 2), text_len=8)
    with pytest.raises(ValueError, match="rolling window"):
        StreamingGenerator(b, window_s=None, graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStream(b.model, (2, 2), text_len=8, capture=True)
    graphed = GraphedStream(b.model, (2, 2), text_len=2)
    emb, mask = b.text_encoder(["a small red ball"])
    with pytest.raises(ValueError, match="≤ 2 text tokens, got 1 of 4"):
        graphed.reset(emb, mask)
    emb, mask = b.text_encoder(["a ball"])
    graphed.reset(emb, mask)
    other = b.model.new_cache(emb, mask, 2)
    cfg = b.config
    v = torch.zeros(1, 1, *cfg.video_latent_hw, cfg.video.latent_channels)
    a = torch.zeros(1, 1, cfg.audio.latent_channels)
    s = torch.ones(1, 1)
    with pytest.raises(ValueError, match="its own reset"):
        graphed.forward_block(v, a, s, s, 0, other)
    with pytest.raises(ValueError, match="text .* differs"):
        other.reset(*b.model.project_text(torch.zeros(1, 5, cfg.text_dim)), mask)
    with pytest.raises(ValueError, match="text mask is needed"):
        other.reset(*b.model.project_text(emb), None)
