"""The learned video decode (`CellDrawer`): chunk-local, saved and checksummed with the codec,
old codecs unchanged, bad drawer tensors named, and a short fit that already draws better."""

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


def _drawer(codec: CellVideoCodec, seed: int = 0) -> CellDrawer:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CellDrawer(codec.latent_channels, codec.height // codec.grid, width=16)
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
