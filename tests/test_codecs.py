"""Embedded codecs: LTX-2 shape semantics, exact chunk-local decode, fitted standardisation,
save/load, clear errors for bad input. Prints the round-trip PSNR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.world import render_clip
from model.codecs import (
    CellVideoCodec,
    EnvelopeAudioCodec,
    load_codecs,
    save_codecs,
)


@pytest.fixture(scope="module")
def clip():  # held-out clip (fit seeds are 10_000..)
    return render_clip(3)


def test_shapes(fitted_codecs, clip) -> None:
    video, audio = fitted_codecs
    zv = video.encode(torch.from_numpy(clip.frames))
    za = audio.encode(torch.from_numpy(clip.audio))
    assert zv.shape == (16, 8, 8, 6) and zv.dtype == torch.float32
    assert za.shape == (126, 16)
    assert video.latent_hw == (8, 8) and video.temporal_factor == 8
    assert (audio.latents_per_second, audio.sample_rate, audio.latent_channels) == (25, 16000, 16)
    assert video.decode(zv).shape == (121, 64, 64, 3)
    assert video.decode(zv[1:4], start=1).shape == (24, 64, 64, 3)
    assert audio.decode(za).shape == (1, 80640)
    # Frame 0 is alone: its DCT channels are zero before standardisation.
    raw0 = zv[0] * video.std + video.mean
    assert torch.allclose(raw0[..., 3:], torch.zeros(8, 8, 3), atol=1e-5)


def test_fitted_standardisation_is_about_unit(fitted_codecs) -> None:
    video, audio = fitted_codecs
    clips = [render_clip(s) for s in range(6)]
    zv = torch.cat([video.encode(torch.from_numpy(c.frames)).reshape(-1, 6) for c in clips])
    za = torch.cat([audio.encode(torch.from_numpy(c.audio)) for c in clips])
    assert zv.mean(0).abs().max() < 0.5 and ((zv.std(0) - 1).abs() < 0.5).all()
    assert za.mean(0).abs().max() < 0.5 and ((za.std(0) - 1).abs() < 0.75).all()  # few pitches
    assert video.config()["fitted"] and audio.config()["fitted"]


def test_chunked_decode_equals_full_decode(fitted_codecs, clip) -> None:
    video, audio = fitted_codecs
    zv = video.encode(torch.from_numpy(clip.frames))
    za = audio.encode(torch.from_numpy(clip.audio))
    parts_v = [video.decode(zv[:4], 0), video.decode(zv[4:10], 4), video.decode(zv[10:], 10)]
    assert torch.equal(video.decode(zv), torch.cat(parts_v))
    parts_a = [audio.decode(za[:26], 0), audio.decode(za[26:51], 26), audio.decode(za[51:], 51)]
    assert torch.equal(audio.decode(za), torch.cat(parts_a, 1))


def test_round_trip_quality(fitted_codecs) -> None:
    video, audio = fitted_codecs
    psnrs = []
    for s in range(4):
        c = render_clip(s)
        dec = video.decode(video.encode(torch.from_numpy(c.frames))).numpy().astype(float)
        psnrs.append(10 * np.log10(255**2 / np.mean((dec - c.frames) ** 2)))
        wav = torch.from_numpy(c.audio)
        rewav = audio.decode(audio.encode(wav))
        # Vocoder output re-encodes to nearly the same envelope (sub-window log-energies).
        za, zb = audio.encode(wav)[:, :8], audio.encode(rewav)[:, :8]
        loud = (za * audio.std[:8] + audio.mean[:8]) > -10  # windows with a burst
        assert (za[loud] - zb[loud]).abs().median() < 0.3
    print(f"video round-trip PSNR {np.mean(psnrs):.2f} dB")
    assert np.mean(psnrs) > 18.0  # blurred 8x8 cells: a coarse but faithful picture


def test_save_load_identical(tmp_path, fitted_codecs, clip) -> None:
    video, audio = fitted_codecs
    save_codecs(tmp_path, video, audio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codec.json", "codec.safetensors"]
    assert json.loads((tmp_path / "codec.json").read_text())["video"]["grid"] == 8
    v2, a2 = load_codecs(tmp_path)
    fr, wav = torch.from_numpy(clip.frames), torch.from_numpy(clip.audio)
    assert torch.equal(v2.encode(fr), video.encode(fr))
    assert torch.equal(v2.decode(video.encode(fr)), video.decode(video.encode(fr)))
    assert torch.equal(a2.decode(audio.encode(wav)), audio.decode(audio.encode(wav)))
    # state/from_state round trip too.
    v3 = CellVideoCodec.from_state(video.config(), video.state())
    assert torch.equal(v3.encode(fr), video.encode(fr))


def test_bad_inputs_are_named(tmp_path, fitted_codecs) -> None:
    video, audio = fitted_codecs
    frames = torch.zeros(120, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"120 frames; expected 1 \+ 8k"):
        video.encode(frames)
    with pytest.raises(ValueError, match="32x32.*64x64"):
        video.encode(torch.zeros(9, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        video.encode(torch.zeros(9, 64, 64, 3))
    with pytest.raises(ValueError, match="80001 samples; expected a multiple of 640"):
        audio.encode(torch.zeros(1, 80001))
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        audio.decode(torch.zeros(5, 15))
    with pytest.raises(ValueError, match="multiples of grid"):
        CellVideoCodec(60, 64)
    with pytest.raises(FileNotFoundError, match="codec.json"):
        load_codecs(tmp_path)
    with pytest.raises(ValueError, match="missing tensor 'std'"):
        EnvelopeAudioCodec.from_state(audio.config(), {"mean": audio.mean})


def test_unfitted_codec_and_tiny_geometry() -> None:
    c = render_clip(1, seconds=1.04, height=32, width=32)
    video = CellVideoCodec(32, 32, grid=4).fit([torch.from_numpy(c.frames)])
    z = video.encode(torch.from_numpy(c.frames))
    assert z.shape == (4, 4, 4, 6)
    assert video.decode(z).shape == (25, 32, 32, 3)
    assert not EnvelopeAudioCodec().config()["fitted"]
