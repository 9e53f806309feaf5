"""Bundles on disk and the streaming generator built on them."""

import json

import pytest
import torch

from model import flow
from model.bundle import Bundle, BundleError
from model.streaming import DEFAULT_WINDOW_S, StreamingGenerator, rollout_blocks
from model.testing import tiny_bundle


def _outputs(bundle):
    cfg = bundle.config
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 4, *cfg.video_latent_hw, cfg.video.latent_channels, generator=g)
    a = torch.randn(1, 26, cfg.audio.latent_channels, generator=g)
    emb, mask = bundle.text_encoder(["a red ball"])
    with torch.no_grad():
        return bundle.model(v, a, torch.full((1, 4), 0.5), torch.full((1, 26), 0.5), emb, mask)


def test_save_load_round_trip_is_identical(tmp_path):
    b = tiny_bundle(seed=1)
    b.save_pretrained(tmp_path / "b")
    c = Bundle.from_pretrained(tmp_path / "b")
    for x, y in zip(_outputs(b), _outputs(c), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    chunks_b = list(StreamingGenerator(b).stream("a red ball", 1, seed=4))
    chunks_c = list(StreamingGenerator(c).stream("a red ball", 1, seed=4))
    assert all(torch.equal(p.frames, q.frames) for p, q in zip(chunks_b, chunks_c, strict=True))


def test_a_student_streams_with_the_sigmas_it_was_distilled_for(tmp_path):
    # distill.student_sigmas travel in the bundle's "sampler" entry; serving samples with them.
    b = tiny_bundle(seed=1)
    b.sigmas = (1.0, 0.8, 0.5, 0.25)
    b.save_pretrained(tmp_path / "b")
    c = Bundle.from_pretrained(tmp_path / "b")
    assert c.sigmas == (1.0, 0.8, 0.5, 0.25) and StreamingGenerator(c).sigmas == c.sigmas
    assert StreamingGenerator(c, sigmas=(1.0, 0.5)).sigmas == (1.0, 0.5)  # an explicit list wins
    own = list(StreamingGenerator(c).stream("a red ball", 1, seed=4))
    dflt = list(
        StreamingGenerator(c, sigmas=flow.DEFAULT_STUDENT_SIGMAS).stream("a red ball", 1, seed=4)
    )
    assert not torch.equal(own[1].frames, dflt[1].frames)
    assert tiny_bundle(seed=1).sigmas is None  # none recorded: the default list
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sampler"]["sigmas"] = [0.5, 0.9]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"sampler.sigmas must be decreasing"):
        Bundle.from_pretrained(tmp_path / "b", verify=False)


def test_modified_weights_fail_the_checksum(tmp_path):
    tiny_bundle().save_pretrained(tmp_path / "b")
    path = tmp_path / "b" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors: checksum"):
        Bundle.from_pretrained(tmp_path / "b")


def test_config_weights_mismatch_names_the_keys(tmp_path):
    tiny_bundle().save_pretrained(tmp_path / "b")
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"missing \['layers\.2\."):
        Bundle.from_pretrained(tmp_path / "b", verify=False)


def test_unknown_config_key_is_rejected(tmp_path):
    tiny_bundle().save_pretrained(tmp_path / "b")
    cfg_path = tmp_path / "b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["layerz"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layerz"):
        Bundle.from_pretrained(tmp_path / "b", verify=False)


def test_a_streamed_context_drawer_decodes_each_chunk_as_the_whole_clip(tmp_path):
    """A bundle whose video codec draws with context (CellDrawer reading the previous latent),
    saved and loaded: the streamed chunks, each decoded with the last latent of the chunk before,
    are byte for byte the whole clip's decode of the same latents."""
    from model.codecs.drawer import CellDrawer

    b = tiny_bundle(seed=2)
    codec = b.video_codec
    torch.manual_seed(0)
    drawer = CellDrawer(codec.latent_channels, codec.height // codec.grid, 16, context=1)
    torch.nn.init.normal_(drawer.head.weight, std=0.05)
    b.video_codec = codec.with_drawer(drawer)
    b.save_pretrained(tmp_path / "b")
    b = Bundle.from_pretrained(tmp_path / "b")
    assert b.video_codec.context_latents == 1
    real, seen = b.video_codec, []

    class Recorder:  # the loaded codec, recording what the stream asks it to decode
        context_latents = 1

        def decode(self, latents, start=0, context=None):
            seen.append(latents.clone())
            return real.decode(latents, start, context)

    b.video_codec = Recorder()
    chunks = list(StreamingGenerator(b).stream("a red ball", 3, seed=5))
    whole = real.decode(torch.cat(seen))
    assert len(chunks) == 4 and torch.equal(torch.cat([c.frames for c in chunks]), whole)


def test_stream_shapes_timing_and_determinism():
    b = tiny_bundle()
    gen = StreamingGenerator(b)
    first = list(gen.stream("a red ball", 2, seed=7))
    again = list(gen.stream("a red ball", 2, seed=7))
    other = list(gen.stream("a red ball", 2, seed=8))
    assert [c.frames.shape[0] for c in first] == [1, 24, 24]
    assert [c.audio.shape[1] for c in first] == [640, 16000, 16000]
    assert sum(c.frames.shape[0] for c in first) == b.config.frames_for(2)
    assert sum(c.audio.shape[1] for c in first) == b.config.samples_for(2)
    assert first[0].frames.dtype == torch.uint8 and first[0].audio.dtype == torch.float32
    assert first[1].t_start == pytest.approx(1 / 24) and first[2].t_end == pytest.approx(2 + 1 / 24)
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(first, again, strict=True))
    assert any(not torch.equal(x.frames, y.frames) for x, y in zip(first, other, strict=True))


def test_served_streams_roll_a_window_that_changes_nothing_up_to_its_length():
    b = tiny_bundle()
    rolling, unbounded = StreamingGenerator(b), StreamingGenerator(b, window_s=None)
    # Memory is flat in the requested length (an hour-long request costs what 10 s cost)...
    assert rolling.new_cache("a", 3600).nbytes() == rolling.new_cache("a", 10).nbytes()
    assert unbounded.new_cache("a", 60).nbytes() > unbounded.new_cache("a", 10).nbytes()
    # ...and the prefix and first DEFAULT_WINDOW_S seconds are those of the unbounded cache, after which
    # the evicted blocks make a difference.
    n = DEFAULT_WINDOW_S + 2
    a = list(rolling.stream("a red ball", n, seed=3))
    c = list(unbounded.stream("a red ball", n, seed=3))
    same = [torch.equal(x.frames, y.frames) for x, y in zip(a, c, strict=True)]
    assert same[: DEFAULT_WINDOW_S + 1] == [True] * (DEFAULT_WINDOW_S + 1) and not all(same)


def test_rollout_exit_step_keeps_gradient_only_at_the_exit():
    b = tiny_bundle()
    model = b.model.train()
    emb, mask = b.text_encoder(["a ball"])
    cache = model.new_cache(emb.detach(), mask, 1)
    g = torch.Generator().manual_seed(0)
    outs = list(rollout_blocks(model, cache, 1, flow.DEFAULT_STUDENT_SIGMAS, g, exit_step=1))
    x0v = outs[-1][1]
    assert x0v.requires_grad
    # The exit step is the last forward of the block: its graph is one forward deep, so the
    # gradient of the block output reaches the weights (but the cache holds no graph).
    x0v.pow(2).mean().backward()
    assert model.layers[0].v_self.to_q.weight.grad.abs().sum() > 0
    assert not cache._slots[0]["video_self"].k.requires_grad


def test_streaming_requires_a_causal_model():
    with pytest.raises(ValueError, match="causal"):
        StreamingGenerator(tiny_bundle(causal=False))
