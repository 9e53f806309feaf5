"""The plain webdataset reader: every bad-sample kind is skipped and counted, locally and on S3."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from data.mp4 import DecodeSpec
from data.reader import BadSampleCounter, iter_samples
from tests.fixtures.s3 import BAD_COUNTS, GOOD_KEYS, make_bucket, upload_folder


def test_every_bad_kind_is_skipped_and_counted(bad_shards, caplog):
    counter = BadSampleCounter()
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        samples = list(iter_samples(bad_shards, counter=counter))
    assert [s.key for s in samples] == GOOD_KEYS
    assert counter.counts() == BAD_COUNTS
    assert counter.total == sum(BAD_COUNTS.values())
    for s in samples:  # good ones are whole: 25 frames of 32x32, 1.04 s of 16 kHz audio
        assert s.frames.shape == (25, 32, 32, 3) and s.audio.shape == (1, 16640)
        assert s.caption == s.meta["caption"] and s.shard.startswith("shard-00000")
    # each skip is logged with its shard and key
    assert "shard=shard-000000.tar key=a7.x" in caplog.text
    assert "(truncated_tar) shard=shard-000001.tar key=b3" in caplog.text


def test_s3_reader_matches_local(bad_shards, s3_env):
    target = make_bucket(s3_env) + "/bad"
    upload_folder(bad_shards, target)
    local, remote = BadSampleCounter(), BadSampleCounter()
    a = list(iter_samples(bad_shards, counter=local))
    b = list(iter_samples(target, counter=remote))
    assert [s.key for s in b] == GOOD_KEYS and remote.events() == local.events()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.frames, y.frames)
        np.testing.assert_array_equal(x.audio, y.audio)


def test_shuffle_is_seeded_and_spec_applies(bad_shards):
    order = [s.key for s in iter_samples(bad_shards, shuffle_seed=1)]
    assert order == [s.key for s in iter_samples(bad_shards, shuffle_seed=1)]
    assert sorted(order) == sorted(GOOD_KEYS)
    short = next(iter(iter_samples(bad_shards, spec=DecodeSpec(num_frames=9))))
    assert short.frames.shape[0] == 9 and short.audio.shape[1] == 5973


def test_counter_is_idempotent_and_strict():
    counter = BadSampleCounter()
    counter.add("no_audio", "s0", "k")
    counter.add("no_audio", "s0", "k")  # a second epoch or a retried task
    counter.add("no_audio", "s1", "k")
    assert counter.counts() == {"no_audio": 2}
    assert counter.metrics() == {"data/bad_samples/no_audio": 2.0, "data/bad_samples/total": 2.0}
    with pytest.raises(ValueError, match="unknown bad-sample kind 'oops'"):
        counter.add("oops", "s", "k")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        list(iter_samples(str(tmp_path)))


def _run_cli(args: list[str]) -> dict:
    import json

    import typer
    from typer.testing import CliRunner

    from data.cli import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_inspect_cli_reports_and_draws(bad_shards, tmp_path):
    sheet = tmp_path / "sheet.png"
    report = _run_cli(["data", "inspect", bad_shards, "--sheet", str(sheet), "--sheet-clips", "2"])
    assert report["samples"] == len(GOOD_KEYS) and report["bad_samples"] == BAD_COUNTS
    assert report["fps"] == {"24": 7} and report["sample_rate"] == {"16000": 7}
    assert report["total_seconds"] == pytest.approx(7 * 1.04)
    blob = sheet.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000


def test_fit_codec_cli_saves_codecs_and_reports_quality(tmp_path):
    from data.synth import synth

    synth(str(tmp_path / "s"), 4, shard_size=2, seed=2, seconds=2.04, height=32, width=32)
    out = tmp_path / "codec"
    report = _run_cli(["data", "fit-codec", str(tmp_path / "s"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["codec.json", "codec.safetensors"]
    assert report["clips"] == 4 and report["video_psnr_db"] > 15
    assert report["contacts"] > 0
    for part in ("mp4_video_found", "mp4_audio_found", "codec_video_found", "codec_audio_found"):
        assert 0 <= report[part] <= report["contacts"]
    # the mp4 itself keeps (nearly) every contact audible
    assert report["mp4_audio_found"] >= 0.8 * report["contacts"]
