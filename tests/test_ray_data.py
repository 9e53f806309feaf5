"""Ray Data builders against a real local Ray and a real moto S3 endpoint.

Both readers must yield the same decoded samples and count the same bad samples; the latent
pipeline must equal encoding the plain reader's samples directly.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch
import typer
from typer.testing import CliRunner

from data.cli import register
from data.ray_data import (
    RayBadSampleCounter,
    build_dataset,
    configure_context,
    latent_dataset,
    rows_to_samples,
)
from data.reader import BadSampleCounter, iter_samples
from tests.fixtures.s3 import BAD_COUNTS, GOOD_KEYS, make_bucket, upload_folder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_synth(s3_env_module: str) -> str:
    """3 synthetic clips written to S3 by the CLI: s3://<bucket>/synth."""
    target = make_bucket(s3_env_module) + "/synth"
    app = typer.Typer()
    register(app)
    args = ["data", "synth", "--out", target, "--clips", "3", "--shard-size", "2", "--seed", "4"]
    result = CliRunner().invoke(
        app, args + ["--seconds", "1.04", "--height", "32", "--width", "32"]
    )
    assert result.exit_code == 0, result.output
    return target


def test_ray_skips_and_counts_like_the_plain_reader(ray_local, bad_shards, s3_env):
    target = make_bucket(s3_env) + "/bad"
    upload_folder(bad_shards, target)
    counter = RayBadSampleCounter()
    got = {s.key: s for s in rows_to_samples(build_dataset(target, counter=counter).iter_rows())}
    assert sorted(got) == GOOD_KEYS
    assert counter.counts() == BAD_COUNTS
    plain = BadSampleCounter()
    for s in iter_samples(bad_shards, counter=plain):
        np.testing.assert_array_equal(got[s.key].frames, s.frames)
        np.testing.assert_array_equal(got[s.key].audio, s.audio)
        assert got[s.key].meta == s.meta and got[s.key].shard == s.shard
    assert counter.events() == plain.events()
    assert counter.metrics()["data/bad_samples/total"] == sum(BAD_COUNTS.values())


def test_latent_dataset_from_s3_matches_direct_encoding(ray_local, s3_synth, tmp_path):
    from model.codecs import fit_codecs, load_codecs, save_codecs

    samples = list(iter_samples(s3_synth))
    save_codecs(tmp_path, *fit_codecs((s.frames, s.audio) for s in samples))
    ds = latent_dataset(s3_synth, str(tmp_path), batch_size=2, actors=1, actor_cpus=0.5)
    rows = {r["key"]: r for r in ds.iter_rows()}
    assert sorted(rows) == ["clip-000000", "clip-000001", "clip-000002"]
    video, audio = load_codecs(tmp_path)
    for s in samples:
        r = rows[s.key]
        assert r["caption"] == s.caption
        want_v = video.encode(torch.from_numpy(s.frames)).numpy()  # [Fv,h,w,C]
        want_a = audio.encode(torch.from_numpy(s.audio)).numpy()  # [Fa,C]
        assert r["video"].dtype == np.float32 and r["video"].shape == want_v.shape
        assert want_v.shape[0] == 4 and want_a.shape[0] == 26  # 1.04 s: 1+3 and 1+25 latents
        np.testing.assert_allclose(r["video"], want_v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["audio"], want_a, rtol=1e-5, atol=1e-5)


def test_unschedulable_actor_pool_fails_instead_of_hanging(ray_local, s3_synth, tmp_path):
    from model.codecs import fit_codecs, save_codecs

    save_codecs(tmp_path, *fit_codecs((s.frames, s.audio) for s in iter_samples(s3_synth)))
    start = time.monotonic()
    ds = latent_dataset(s3_synth, str(tmp_path), actor_cpus=64, wait_for_min_actors_s=5)
    with pytest.raises(ray.exceptions.GetTimeoutError, match="Timed out while starting actors"):
        ds.take(1)
    assert time.monotonic() - start < 120
    configure_context(300.0)  # do not leave a 5 s wait to the datasets of later tests


def test_gpu_codec_actor_without_a_device_says_so(s3_synth, tmp_path):
    # data.codec_gpus > 0 moves learned codecs to the actor's CUDA device; with none visible the
    # actor fails at start with the config key, not deep inside a VAE.
    from data.ray_data import CodecEncoder
    from model.codecs import fit_codecs, save_codecs

    save_codecs(tmp_path, *fit_codecs((s.frames, s.audio) for s in iter_samples(s3_synth)))
    if torch.cuda.is_available():
        enc = CodecEncoder(str(tmp_path), gpu=True)
        assert enc.video is not None and enc.audio is not None
        return
    with pytest.raises(RuntimeError, match=r"data.codec_gpus > 0 .* no CUDA device"):
        CodecEncoder(str(tmp_path), gpu=True)
