"""The DiT on random weights: causality, KV-cache = full forward, sinks, bidirectional mode, size."""

import pytest
import torch

from model import AVDiT, BlockLayout, preset
from model.rope import RopeTables, apply_rope, pair_tables, rope_cos_sin
from model.testing import tiny_config

B, SECONDS = 2, 3


def _inputs(cfg, seconds=SECONDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = BlockLayout(seconds)
    h, w = cfg.video_latent_hw
    v = torch.randn(B, lay.num_video, h, w, cfg.video.latent_channels, generator=g)
    a = torch.randn(B, lay.num_audio, cfg.audio.latent_channels, generator=g)
    sv = torch.rand(B, lay.num_video, generator=g)
    sa = torch.rand(B, lay.num_audio, generator=g)
    text = torch.randn(B, 5, cfg.text_dim, generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return lay, v, a, sv, sa, text, mask


@pytest.fixture(scope="module", params=["omniforcing", "ltx2"])
def student(request):
    """The tiny causal student on our arch and on LTX-2.0's (the same OmniForcing additions)."""
    torch.manual_seed(0)
    return AVDiT(tiny_config(request.param, causal=True)).eval()


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("which", ["video", "audio", "sigma"])
def test_later_blocks_cannot_change_earlier_outputs(student, k, which):
    lay, v, a, sv, sa, t, m = _inputs(student.cfg)
    with torch.no_grad():
        ref_v, ref_a = student(v, a, sv, sa, t, m)
        v2, a2, sv2, sa2 = v.clone(), a.clone(), sv.clone(), sa.clone()
        nv0, nv1 = lay.video_range(k + 1)
        na0, na1 = lay.audio_range(k + 1)
        if which == "video":
            v2[:, nv0:nv1] += 3 * torch.randn_like(v2[:, nv0:nv1])
        elif which == "audio":
            a2[:, na0:na1] += 3 * torch.randn_like(a2[:, na0:na1])
        else:
            sv2[:, nv0:nv1] = 1 - sv2[:, nv0:nv1]
            sa2[:, na0:na1] = 1 - sa2[:, na0:na1]
        out_v, out_a = student(v2, a2, sv2, sa2, t, m)
    ev, ea = lay.video_range(k)[1], lay.audio_range(k)[1]
    # Earlier blocks (both streams) are bit-for-bit unaffected …
    torch.testing.assert_close(out_v[:, :ev], ref_v[:, :ev], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_a[:, :ea], ref_a[:, :ea], rtol=0, atol=1e-6)
    # … while the perturbed block itself does change (the test can fail).
    assert (out_v[:, nv0:nv1] - ref_v[:, nv0:nv1]).abs().max() > 1e-3
    assert (out_a[:, na0:na1] - ref_a[:, na0:na1]).abs().max() > 1e-3


def test_bidirectional_mode_sees_the_future():
    torch.manual_seed(0)
    teacher = AVDiT(preset("tiny")).eval()
    assert not hasattr(teacher, "audio_sinks")
    lay, v, a, sv, sa, t, m = _inputs(teacher.cfg)
    with torch.no_grad():
        ref_v, ref_a = teacher(v, a, sv, sa, t, m)
        a2 = a.clone()
        a2[:, -1] += 3.0
        out_v, out_a = teacher(v, a2, sv, sa, t, m)
    assert (out_v[:, :1] - ref_v[:, :1]).abs().max() > 1e-4  # audio's end reaches V0


@pytest.mark.parametrize("windows", [(None, None), (2, 3), (1, 1)])
def test_kv_cache_streaming_equals_full_block_causal_forward(student, windows):
    seconds = 4
    lay, v, a, _, _, t, m = _inputs(student.cfg, seconds)
    cache = student.new_cache(t, m, seconds, windows)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.no_grad():
        for k in range(lay.num_blocks):
            (v0, v1), (a0, a1) = lay.video_range(k), lay.audio_range(k)
            nv = torch.randn(v[:, v0:v1].shape, generator=g)
            na = torch.randn(a[:, a0:a1].shape, generator=g)
            for sigma in (1.0, 0.6):  # several denoising calls before the commit
                sv = torch.full((B, v1 - v0), sigma)
                sa = torch.full((B, a1 - a0), sigma)
                out_v, out_a = student.forward_block(nv, na, sv, sa, k, cache)
                # Reference: clean context before block k, block k noisy, later blocks anything.
                fv, fa = v.clone(), a.clone()
                fv[:, v0:v1], fa[:, a0:a1] = nv, na
                fsv, fsa = torch.zeros(B, lay.num_video), torch.zeros(B, lay.num_audio)
                fsv[:, v0:v1], fsa[:, a0:a1] = sigma, sigma
                ref_v, ref_a = student(fv, fa, fsv, fsa, t, m, windows=windows)
                worst = max(
                    worst,
                    (ref_v[:, v0:v1] - out_v).abs().max().item(),
                    (ref_a[:, a0:a1] - out_a).abs().max().item(),
                )
            zv, za = torch.zeros(B, v1 - v0), torch.zeros(B, a1 - a0)
            student.forward_block(v[:, v0:v1], a[:, a0:a1], zv, za, k, cache, commit=True)
    assert worst < 1e-5
    if windows[0] is not None:  # eviction really happened: the buffer holds prefix + window only
        assert cache.filled["v"] <= cache.prefix["v"] + (windows[0] - 1) * cache.block["v"]


def test_cache_rejects_blocks_out_of_order(student):
    lay, v, a, sv, sa, t, m = _inputs(student.cfg)
    cache = student.new_cache(t, m, SECONDS)
    with pytest.raises(ValueError, match="out of order"):
        student.forward_block(v[:, 1:4], a[:, 1:26], sv[:, 1:4], sa[:, 1:26], 1, cache)


def test_rope_rotates_pairs_and_keeps_relative_positions():
    """apply_rope is the pairwise rotation (x1 c − x2 s, x2 c + x1 s); q·k after it depends only on
    the positions' difference, and norms are kept."""
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(6, 1, generator=g) * 10  # seconds
    cos, sin = rope_cos_sin(pos, (20.0,), 16, 10000.0)  # [6, 8]
    x = torch.randn(2, 3, 6, 16, generator=g)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    want = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    got = apply_rope(x, *pair_tables(cos, sin))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(pq: float, pk: float) -> float:
        c, s = pair_tables(*rope_cos_sin(torch.tensor([[pq], [pk]]), (20.0,), 16, 10000.0))
        rq = apply_rope(q.view(1, 1, 1, 16), c[:1], s[:1])
        rk = apply_rope(k.view(1, 1, 1, 16), c[1:], s[1:])
        return float((rq * rk).sum())

    assert score(1.0, 3.5) == pytest.approx(score(7.0, 9.5), abs=1e-5)
    assert abs(score(1.0, 3.5) - score(1.0, 1.5)) > 1e-3


def test_sinks_have_identity_rotation_and_are_stripped(student):
    cfg = student.cfg
    s = cfg.sinks
    rope = RopeTables(cfg, torch.arange(4), torch.arange(26), s)
    x = torch.randn(1, cfg.audio.heads, s + 26, cfg.audio.width // cfg.audio.heads)
    for cos, sin in (rope.audio_self, rope.audio_cross):
        rotated = apply_rope(x, cos, sin)
        torch.testing.assert_close(rotated[:, :, :s], x[:, :, :s], rtol=0, atol=0)
        assert (rotated[:, :, s:] - x[:, :, s:]).abs().max() > 1e-3  # real tokens do rotate
    lay, v, a, sv, sa, t, m = _inputs(cfg)
    with torch.no_grad():
        out_v, out_a = student(v, a, sv, sa, t, m)
        assert out_a.shape == a.shape and out_v.shape == v.shape
        student.audio_sinks.add_(1.0)
        moved_v, moved_a = student(v, a, sv, sa, t, m)
        student.audio_sinks.sub_(1.0)
    assert (moved_a - out_a).abs().max() > 1e-4 and (moved_v - out_v).abs().max() > 1e-4


def test_same_seed_same_weights_and_outputs():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        mdl = AVDiT(preset("tiny", causal=True)).eval()
        lay, v, a, sv, sa, t, m = _inputs(mdl.cfg, seed=5)
        with torch.no_grad():
            outs.append(mdl(v, a, sv, sa, t, m))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_ltx2_size_on_meta_device():
    with torch.device("meta"):
        big = AVDiT(preset("ltx2", causal=True))
    counts = big.param_counts()
    assert abs(counts["total"] - 19e9) / 19e9 < 0.10
    assert 12.5e9 < counts["video"] < 15.5e9 and 3.5e9 < counts["audio"] < 6e9


@pytest.mark.parametrize("windows", [(None, None), (2, 3)])
def test_flex_attention_masks_match_dense_sdpa(student, windows):
    flex = AVDiT(student.cfg.replace(attention="flex")).eval()
    flex.load_state_dict(student.state_dict())
    lay, v, a, sv, sa, t, m = _inputs(student.cfg)
    with torch.no_grad():
        ref = student(v, a, sv, sa, t, m, windows=windows)
        out = flex(v, a, sv, sa, t, m, windows=windows)
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_unknown_attention_backend_is_rejected():
    with pytest.raises(ValueError, match="model.attention"):
        preset("tiny", attention="flash")
