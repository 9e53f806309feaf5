"""Teacher stage end to end on real parts: local Ray (2 workers, fractional CPUs), DeepSpeed
ZeRO-2 and ZeRO-3 over gloo, checkpoints on the local S3 endpoint, a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from model import flow
from pipeline import tracking
from pipeline.config import ConfigError, load_config
from pipeline.stages.teacher import TeacherStage
from pipeline.trainer import run_stage

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _sigmas(overrides: list[str], batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The (video, audio) training σ [B] the teacher stage draws under `overrides`."""
    cfg = load_config(CONFIG, overrides)
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    video, audio = torch.zeros(batch, 2, 1, 1, 1), torch.zeros(batch, 3, 1)
    g = torch.Generator().manual_seed(0)
    _, _, sv, sa, _, _ = TeacherStage()._noised(video, audio, g, ctx)
    assert (sv == sv[:, :1]).all() and (sa == sa[:, :1]).all()  # one σ per stream and sample
    return sv[:, 0], sa[:, 0]


def test_training_sigma_follows_train_sigma() -> None:
    """train.sigma.{video,audio} shift each stream's logit-normal σ draws (independent per
    modality); the default is the plain logit-normal(0, 1) earlier runs drew, so their resumes
    see the same noise."""
    sv, sa = _sigmas([])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sv, flow.logit_normal([len(sv)], g))
    assert not torch.equal(sv, sa)
    hv, ha = _sigmas(["train.sigma.video.mean=1.5", "train.sigma.video.std=0.5"])
    assert abs(float(hv.median()) - float(torch.sigmoid(torch.tensor(1.5)))) < 0.01
    assert float((hv > 0.7).float().mean()) > 0.9 > float((sv > 0.7).float().mean())
    assert abs(float(ha.median()) - 0.5) < 0.03  # the audio keeps the default
    _, ha = _sigmas(["train.sigma.audio.mean=-1"])
    assert abs(float(ha.median()) - float(torch.sigmoid(torch.tensor(-1.0)))) < 0.01
    with pytest.raises(ConfigError, match="train.sigma.video.std"):
        load_config(CONFIG, ["train.sigma.video.std=0"])


def test_tied_sigma_gives_that_share_of_samples_one_sigma() -> None:
    """train.sigma.tied = p: about p of the samples train at the joint sampler's condition (audio
    σ = video σ); the rest keep independent draws; out-of-range shares are refused by key path."""
    sv, sa = _sigmas(["train.sigma.tied=0.5", "train.sigma.video.mean=1"])
    same = sv == sa
    assert 0.3 < float(same.float().mean()) < 0.7
    assert float(sa[~same].median()) < 0.6 < float(sv.median())  # untied audio keeps mean 0
    sv1, sa1 = _sigmas(["train.sigma.tied=1"])
    assert torch.equal(sv1, sa1)
    with pytest.raises(ConfigError, match="train.sigma.tied"):
        load_config(CONFIG, ["train.sigma.tied=1.5"])


def test_staggered_sigma_share_trains_the_staggered_sampler_condition() -> None:
    """train.sigma.stagger = p: about p of the samples get per-frame σ on `flow.staggered_sigmas`
    (earlier frames cleaner, floored at 0.02, audio and video on one τ and Δ); the rest keep one
    σ per stream; out-of-range shares are refused by key path."""
    cfg = load_config(CONFIG, ["train.sigma.stagger=0.5", "train.sigma.stagger_max=3"])
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    stage = TeacherStage()
    stage.mcfg = cfg.build_model_config(causal=False)
    video, audio = torch.zeros(2048, 6, 1, 1, 1), torch.zeros(2048, 26, 1)
    _, _, sv, sa, _, _ = stage._noised(video, audio, torch.Generator().manual_seed(0), ctx)
    staggered = (sv != sv[:, :1]).any(1)
    assert 0.4 < float(staggered.float().mean()) < 0.6
    assert torch.all(sv[staggered, 1:] >= sv[staggered, :-1]) and float(sv.min()) > 0.0199
    # One schedule for both streams: the first and last frames of each sit at the same σ.
    torch.testing.assert_close(sv[staggered][:, [0, -1]], sa[staggered][:, [0, -1]])
    assert (sa[~staggered] == sa[~staggered][:, :1]).all()
    with pytest.raises(ConfigError, match="train.sigma.stagger"):
        load_config(CONFIG, ["train.sigma.stagger=2"])


def _s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


@pytest.mark.slow
def test_teacher_zero2_two_workers_s3_and_mlflow(
    ray_local, mlflow_uri: str, s3_bucket: str, s3_env: str
) -> None:
    cfg = load_config(
        CONFIG,
        [
            "train.steps=8",
            "train.checkpoint_every=4",
            "train.reliance_every=4",
            "train.plot_every=4",
            f"storage.path={s3_bucket}/runs",
            f"storage.endpoint={s3_env}",
            "mlflow.experiment=teacher-z2",
        ],
    )
    res = run_stage(cfg, "teacher")
    assert res.step == 8
    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)

    # Params = the flattened resolved config; tags say where the checkpoint is.
    assert (
        run.data.params["train.zero_stage"] == "2" and run.data.params["scaling.num_workers"] == "2"
    )
    assert run.data.tags[tracking.STATUS_TAG] == "finished"
    ckpt = run.data.tags[tracking.CKPT_TAG]
    assert ckpt.startswith(s3_bucket + "/runs/") and ckpt.endswith("step-00000008")

    # Metrics: every step exactly once, per-modality losses, and the loss goes down.
    loss = [(m.step, m.value) for m in client.get_metric_history(res.run_id, "loss")]
    assert sorted(s for s, _ in loss) == list(range(1, 9))
    values = [v for _, v in sorted(loss)]
    assert sum(values[-2:]) < sum(values[:2]), values
    for key in (
        "loss/video",
        "loss/audio",
        "grad_norm",
        "lr",
        "samples_per_s",
        "bad_samples",
        "reliance/audio_on_video",
        "reliance/video_on_audio",
    ):
        assert client.get_metric_history(res.run_id, key), key
    assert [m.step for m in client.get_metric_history(res.run_id, "reliance/audio_on_video")] == [
        4,
        8,
    ]

    # Artifacts: resolved config, loss curve, consolidated bundle.
    arts = {
        a.path for d in ("config", "plots", "bundle") for a in client.list_artifacts(res.run_id, d)
    }
    assert {"config/resolved.json", "plots/loss_curve.png", "bundle/model.safetensors"} <= arts
    sheets = {a.path for a in client.list_artifacts(res.run_id, "samples/step-00000004")}
    assert sheets == {
        "samples/step-00000004/contact_sheet.png",
        "samples/step-00000004/sample.mp4",
    }

    # The checkpoint landed in S3: engine shards from both ranks, meta last; only 2 kept.
    bucket = s3_bucket.removeprefix("s3://")
    keys = _s3_keys(s3_env, bucket, "runs/")
    prefix = ckpt.removeprefix(s3_bucket + "/")
    mine = [k for k in keys if k.startswith(prefix + "/")]
    assert prefix + "/meta.json" in mine
    assert any("zero_pp_rank_1" in k for k in mine) and any("zero_pp_rank_0" in k for k in mine)
    assert (
        prefix + "/rng/rank1.safetensors" in mine
        and prefix + "/ema/teacher-rank0.safetensors" in mine
    )
    step_dirs = {k.split("/")[2] for k in keys if "/step-" in k}
    assert step_dirs == {"step-00000004", "step-00000008"}


@pytest.mark.slow
def test_teacher_zero3_two_workers_exports_a_loadable_bundle(ray_local, tmp_path: Path) -> None:
    from model.bundle import Bundle

    cfg = load_config(
        CONFIG,
        [
            "train.steps=3",
            "train.zero_stage=3",
            "train.checkpoint_every=3",
            "train.reliance_every=0",
            f"storage.path={tmp_path}",
            "mlflow.experiment=teacher-z3",
        ],
    )
    res = run_stage(cfg, "teacher")
    assert res.step == 3 and res.tracking_uri.startswith("sqlite:///")
    client = MlflowClient(res.tracking_uri)
    vals = [m.value for m in client.get_metric_history(res.run_id, "loss")]
    assert len(vals) == 3 and all(v == v and v < 100 for v in vals)
    meta = json.loads((Path(res.checkpoint_uri) / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config"]["train"]["zero_stage"] == 3
    # ZeRO-3 partitions were gathered into full tensors: the bundle loads strictly.
    bundle = Bundle.from_pretrained(Path(res.checkpoint_uri) / "bundle")
    assert bundle.config.causal is False and bundle.config.name == "tiny"
