"""The demo teacher shipped in the package: it loads by its short name, its checksum guards it,
its training record matches it, and it behaves like a trained teacher (caption adherence)."""

import json
import shutil

import pytest
import torch

from model.bundle import BundleError
from pipeline.distill import roles
from pipeline.evaluate import evaluate, generate, world_clips

RECORD = roles.SHIPPED_TEACHER.parent / "demo-teacher-record"


@pytest.fixture(scope="module")
def shipped():
    return roles.load_teacher(roles.SHIPPED)


def test_shipped_teacher_is_a_bidirectional_demo_teacher_with_fitted_codecs(shipped):
    cfg = shipped.model.cfg
    assert cfg.name == "demo" and not cfg.causal
    assert roles.bundle_uri("shipped") == str(roles.SHIPPED_TEACHER)
    # Codecs fitted on the world (their statistics), not the identity defaults.
    assert shipped.video_codec.fitted and shipped.audio_codec.fitted
    assert not torch.allclose(shipped.video_codec.std, torch.ones_like(shipped.video_codec.std))
    # Its video codec draws with a drawer that reads the previous latent (streamed with it), and
    # its record says the round trip meets issue 24's bar: >= 30 dB, peak within 10 %.
    assert shipped.video_codec.context_latents == 1
    drawer = json.loads((RECORD / "drawer-fit.json").read_text())
    assert drawer["drawn"]["psnr_db"] >= 30.0 and abs(drawer["drawn"]["peak_ratio"] - 1) <= 0.1
    record = json.loads((RECORD / "training.json").read_text())
    assert record["steps"] >= 2000 and record["batch_size"] == 16
    assert (RECORD / f"eval-step{record['steps']}.json").is_file()
    # It samples with autoguidance: an earlier checkpoint of its own run, frozen, same latents.
    guide = shipped.guide
    assert guide is not None and guide.weight > 0 and record["guide"]["step"] < record["steps"]
    assert guide.model.cfg.video_latent_hw == cfg.video_latent_hw and not guide.model.cfg.causal
    assert not any(p.requires_grad for p in guide.model.parameters())
    # It samples on the staggered schedule it was fine-tuned for, as its record says.
    assert shipped.stagger > 0 and record["sampler"]["stagger"] == shipped.stagger
    assert f"--stagger {shipped.stagger:g}" in record["exported"]
    assert record["fine_tunes"][-1]["sigma"]["stagger"] > 0


def test_a_modified_shipped_file_fails_clearly(tmp_path):
    copy = shutil.copytree(roles.SHIPPED_TEACHER, tmp_path / "teacher")
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="model.safetensors: checksum"):
        roles.load_teacher(str(copy))


def test_shipped_teacher_follows_its_captions(shipped):
    """Two one-ball prompts, 2 s, 16 Euler steps: the ball's colour and the tone's pitch follow
    the caption (100 % since step 1000 of its training; a random network is at chance, 25 %)."""
    prompts = [c.meta["caption"] for c in world_clips(2, 2, seed=3, height=64, width=64)]
    clips = generate(shipped, prompts, 2, seed=0, teacher_steps=16)
    report = evaluate(clips)
    assert report["colour_acc"] == 1.0 and report["pitch_acc"] == 1.0
