"""The learned video decode (`CellDrawer`): chunk-local, saved and checksummed with the codec,
old codecs unchanged, bad drawer tensors named, and a short fit that already draws better. The
drawer with context (it reads the previous latent): streamed chunk by chunk with the last latent
of the chunk before, it equals the whole-clip decode bit for bit; drawers without context, and
codecs without a drawer, load and decode as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from data.draw import round_trip, world_clips
from data.world import render_clip
from model.codecs import CellVideoCodec, fit_codecs, load_codecs, save_codecs
from model.codecs.drawer import CellDrawer, fit_drawer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codecs():
    clips = [render_clip(s, height=32, width=32) for s in range(4)]
    return fit_codecs(((c.frames, c.audio) for c in clips), grid=4)


def _drawer(codec: CellVideoCodec, seed: int = 0, context: int = 0) -> CellDrawer:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CellDrawer(codec.latent_channels, codec.height // codec.grid, 16, context)
    for p in net.head.parameters():  # a non-trivial correction (the fresh head is zero)
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(seed))
    return net.eval()


def test_drawn_decode_is_chunk_local_and_differs_from_linear(codecs) -> None:
    video = codecs[0].with_drawer(_drawer(codecs[0]))
    z = video.encode(torch.as_tensor(render_clip(7, height=32, width=32).frames))  # [16, 4, 4, 6]
    whole = video.decode(z)
    parts = torch.cat([video.decode(z[:1], 0), video.decode(z[1:4], 1), video.decode(z[4:], 4)])
    assert whole.shape == (121, 32, 32, 3)
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, codecs[0].decode(z))


def test_context_drawer_streams_chunk_by_chunk_as_the_whole_clip(codecs) -> None:
    """Chunks of 1, 3 and 5 latents, each decoded with the latents before it as `context` (what
    model.streaming.ChunkDecoder carries): the same bytes as one whole-clip decode. Without the
    context a chunk draws differently, so the drawer does read its previous latent."""
    from model.streaming import ChunkDecoder

    video = codecs[0].with_drawer(_drawer(codecs[0], seed=2, context=1))
    assert video.context_latents == 1 and video.config()["drawer"]["context"] == 1
    z = video.encode(torch.as_tensor(render_clip(7, height=32, width=32).frames))  # [16, 4, 4, 6]
    whole = video.decode(z)
    for size in (1, 3, 5):
        dec = ChunkDecoder(video, time_axis=0)
        parts = [dec.push(z[:1], 0)]
        for s in range(1, len(z), size):
            parts.append(dec.push(z[s : s + size], s))
            assert dec.context.shape == (1, *z.shape[1:])  # one latent carried, never a later one
            assert torch.equal(dec.context[0], z[min(s + size, len(z)) - 1])
        assert dec.flush() is None  # no look-ahead: nothing held back
        assert torch.equal(torch.cat(parts), whole), size
    assert not torch.equal(video.decode(z[4:], 4), whole[1 + 8 * 3 :])  # no context: differs
    assert torch.equal(video.decode(z[4:], 4, context=z[:4]), whole[1 + 8 * 3 :])
    # Causal: changing a later latent leaves every earlier frame as it was.
    later = z.clone()
    later[9] += 1.0
    assert torch.equal(video.decode(later)[: 1 + 8 * 8], whole[: 1 + 8 * 8])
    assert not torch.equal(video.decode(later)[1 + 8 * 9 :], whole[1 + 8 * 9 :])


def test_context_drawer_warm_starts_from_one_without_and_round_trips(codecs, tmp_path) -> None:
    """`load_from` copies a drawer without context into one with (the extra stem channels zero):
    it draws the same frames until trained. Saved and loaded, the context drawer keeps its
    config and bytes; a codec saved before context existed loads with context 0."""
    old = codecs[0].with_drawer(_drawer(codecs[0], seed=3))
    new = codecs[0].with_drawer(CellDrawer(6, 8, 16, context=1).load_from(old.drawer))
    z = old.encode(torch.as_tensor(render_clip(4, height=32, width=32).frames))
    assert torch.equal(new.decode(z), old.decode(z))
    torch.nn.init.normal_(new.drawer.stem.weight, std=0.1)
    save_codecs(tmp_path / "new", new, codecs[1])
    back, _ = load_codecs(tmp_path / "new")
    assert back.config() == new.config() and torch.equal(back.decode(z), new.decode(z))
    save_codecs(tmp_path / "old", old, codecs[1])
    cfg = json.loads((tmp_path / "old" / "codec.json").read_text())
    assert "context" not in cfg["video"]["drawer"]  # the format of session-13 drawers
    back, _ = load_codecs(tmp_path / "old")
    assert back.context_latents == 0 and torch.equal(back.decode(z), old.decode(z))


def test_a_codec_without_drawer_decodes_linearly_as_before(codecs) -> None:
    video = codecs[0]
    assert video.drawer is None and "drawer" not in video.config()
    z = video.encode(torch.as_tensor(render_clip(3, height=32, width=32).frames))
    # The linear path: cell maps, bilinear upsampling, clamp, round (what decode always did).
    frames = torch.cat([video.linear_frames(z[0], True)[:1]] +
                       [video.linear_frames(z[i], False) for i in range(1, len(z))])  # fmt: skip
    want = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(video.decode(z), want)


def test_drawer_round_trips_through_codec_files(codecs, tmp_path: Path) -> None:
    video = codecs[0].with_drawer(_drawer(codecs[0]))
    save_codecs(tmp_path, video, codecs[1])
    back, _ = load_codecs(tmp_path)
    assert back.config() == video.config() and back.drawer is not None
    z = video.encode(torch.as_tensor(render_clip(5, height=32, width=32).frames))
    assert torch.equal(back.decode(z), video.decode(z))


def test_bad_drawer_tensors_are_named(codecs) -> None:
    video = codecs[0].with_drawer(_drawer(codecs[0]))
    state = video.state()
    missing = {k: v for k, v in state.items() if k != "drawer.head.bias"}
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        CellVideoCodec.from_state(video.config(), missing)
    wrong = dict(state) | {"drawer.head.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"drawer.head.bias: shape \(5,\), expected \(24,\)"):
        CellVideoCodec.from_state(video.config(), wrong)
    bad_spec = video.config() | {"drawer": {"scale": 3}}
    with pytest.raises(ValueError, match="power of two"):
        CellVideoCodec.from_state(bad_spec, state)


def test_a_short_fit_draws_its_clip_better_and_is_seeded() -> None:
    """150 steps on one 64 × 64 clip (the demo's size: balls of radius 4-6 px) already beat the
    linear decode on it (a fit that cannot learn, or learns the wrong target, fails this); the
    same seed gives the same drawer."""
    clips = [render_clip(s) for s in range(2)]
    video, _ = fit_codecs(((c.frames, c.audio) for c in clips), grid=8)
    one = world_clips(video, seed=100, balls=1)(0)
    nets = [fit_drawer(video, lambda i: one, steps=150, batch=8, width=16, lr=5e-3, seed=1)
            for _ in range(2)]  # fmt: skip
    assert torch.equal(nets[0].head.weight, nets[1].head.weight)
    before, after = round_trip(video, [one]), round_trip(video.with_drawer(nets[0]), [one])
    assert after["psnr_db"] > before["psnr_db"] + 2.0, (before, after)  # +6.6 dB measured


def test_a_context_fit_on_noised_latents_with_the_boundary_term_is_seeded(codecs) -> None:
    """A few steps of the context drawer's fit (pairs of groups, noised latents, boundary
    term), warm-started: same seed, same weights; it moves away from its start."""
    video = codecs[0]
    init = _drawer(video, seed=5)
    clip = world_clips(video, seed=100, balls=1)

    def fit(seed: int) -> CellDrawer:
        return fit_drawer(video, clip, steps=3, batch=4, seed=seed, context=1, noise=0.3,
                          boundary=1.0, init=init, consistency=0.1)  # fmt: skip

    a, b, c = fit(0), fit(0), fit(1)
    assert a.context == 1 and torch.equal(a.stem.weight, b.stem.weight)
    assert not torch.equal(a.stem.weight, c.stem.weight)
    assert a.stem.weight[:, 7:].abs().sum() > 0  # the context channels learned something


def test_encode_groups_is_the_encoder_on_float_frames(codecs) -> None:
    """The differentiable re-encoding the consistency term uses gives `encode`'s latents."""
    video = codecs[0]
    frames = torch.as_tensor(render_clip(2, height=32, width=32).frames)
    x = frames.float() / 255.0
    groups = torch.cat([x[:1].expand(8, -1, -1, -1)[None], x[1:].reshape(-1, 8, *x.shape[1:])])
    lone = torch.arange(len(groups)) == 0
    torch.testing.assert_close(video.encode_groups(groups, lone), video.encode(frames))


def test_cli_fit_drawer_writes_codec_report_and_strip(codecs, tmp_path: Path) -> None:
    from pipeline.cli import app

    save_codecs(tmp_path / "in", *codecs)
    res = CliRunner().invoke(app, ["data", "fit-drawer", str(tmp_path / "in"), "--out",
                                   str(tmp_path / "out"), "--steps", "4", "--batch", "4",
                                   "--width", "16"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "drawer-fit.json").read_text())
    assert report["steps"] == 4 and report["linear"]["psnr_db"] > 10
    assert (tmp_path / "out" / "drawer-strip.png").stat().st_size > 1000
    video, _ = load_codecs(tmp_path / "out")
    assert video.drawer is not None
    held = [world_clips(video, 900_000, 2)(0)]
    assert round_trip(video, held)["psnr_db"] == pytest.approx(report["drawn"]["psnr_db"], abs=3)
    res = CliRunner().invoke(app, ["data", "fit-drawer", str(tmp_path / "nowhere"), "--out",
                                   str(tmp_path / "x"), "--steps", "1"])  # fmt: skip
    assert res.exit_code != 0
