"""A teacher that samples on a staggered schedule (`flow.staggered_sigmas`, Bundle.stagger): the
bundle carries Δ (checksummed), every teacher sampler follows it, the ODE stage's trajectories
are its reflow states, cached rows are keyed by it, and `omniforcing export --stagger` sets it."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from model import flow
from model.bundle import Bundle, BundleError
from model.guidance import teacher_velocity
from model.sampling import sample_teacher
from model.testing import tiny_bundle
from pipeline.cli import app
from pipeline.distill.trajectories import teacher_trajectory
from pipeline.distill.trajectory_shards import teacher_fingerprint

PROMPTS = ["a red ball", "a small blue ball"]


def _clip(b: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return sample_teacher(b.model, b.text_encoder, PROMPTS[:1], 1, g, steps=4, stagger=b.stagger)


def test_bundle_carries_its_stagger_and_samples_with_it(tmp_path) -> None:
    b = tiny_bundle(seed=1, causal=False)
    joint = _clip(b)
    b.stagger = 1.5
    staggered, again = _clip(b), _clip(b)
    assert all(torch.equal(x, y) for x, y in zip(staggered, again, strict=True))
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(staggered, joint, strict=True))
    b.save_pretrained(tmp_path / "t")
    loaded = Bundle.from_pretrained(tmp_path / "t")
    assert loaded.stagger == 1.5
    assert all(torch.equal(x, y) for x, y in zip(staggered, _clip(loaded), strict=True))
    # A joint-schedule bundle writes no sampler entry (older readers see what they always saw).
    tiny_bundle(seed=1, causal=False).save_pretrained(tmp_path / "j")
    assert "sampler" not in json.loads((tmp_path / "j" / "config.json").read_text())
    # Δ sits in the checksummed config.json; a bad value is named when read unverified.
    cfg_path = tmp_path / "t" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"sampler": {"stagger": -1}}))
    for verify, match in ((True, "checksum"), (False, "sampler.stagger")):
        try:
            Bundle.from_pretrained(tmp_path / "t", verify=verify)
        except BundleError as e:
            assert match in str(e)
        else:
            raise AssertionError("a modified sampler entry loaded")


@torch.no_grad()
def test_trajectory_of_a_staggered_teacher_is_its_reflow_line(tmp_path) -> None:
    b = tiny_bundle(seed=1, causal=False)
    shapes = ((4, *b.config.video_latent_hw, 6), (26, b.config.audio.latent_channels))
    args = (PROMPTS, [7, 8], shapes, [1.0, 0.5], 4, (3.0, 5.0))
    tv, ta, sig = teacher_trajectory(b.model, b.text_encoder, *args, stagger=2.0)
    assert sig.tolist() == [1.0, 0.5, 0.0]
    nv, na = tv[:, 0], ta[:, 0]  # σ = 1: the noise itself
    assert torch.equal(nv[0], flow.randn(shapes[0], torch.Generator().manual_seed(7)))
    text, null = b.text_encoder(PROMPTS), b.text_encoder([""])

    def velocity(xv, xa, sv, sa):
        return teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0))

    n_tokens = 4 * b.config.video_tokens_per_frame + 26
    ev, ea = flow.euler_sample_staggered(
        velocity, nv, na, flow.staggered_table(4, 2.0, n_tokens), 2.0
    )
    torch.testing.assert_close(tv[:, -1], ev), torch.testing.assert_close(ta[:, -1], ea)
    torch.testing.assert_close(tv[:, 1], 0.5 * ev + 0.5 * nv)
    joint = teacher_trajectory(b.model, b.text_encoder, *args)
    assert (joint[0][:, -1] - ev).abs().max() > 1e-3


def test_cache_key_and_export_cli_follow_the_stagger(tmp_path) -> None:
    b = tiny_bundle(seed=1, causal=False)
    b.save_pretrained(tmp_path / "joint")
    runner = CliRunner()
    out = tmp_path / "staggered"
    args = ["export", "--checkpoint", str(tmp_path / "joint"), "--out", str(out)]
    res = runner.invoke(app, [*args, "--stagger", "2"])
    assert res.exit_code == 0, res.output
    assert Bundle.from_pretrained(out).stagger == 2.0
    manifest = json.loads((tmp_path / "joint" / "manifest.json").read_text())
    assert teacher_fingerprint(tmp_path / "joint") == manifest["model.safetensors"]
    assert teacher_fingerprint(out) != teacher_fingerprint(tmp_path / "joint")
    # Re-exported without --stagger it keeps its Δ; a negative Δ is refused, the bundle intact.
    res = runner.invoke(app, ["export", "--checkpoint", str(out), "--out", str(tmp_path / "re")])
    assert res.exit_code == 0 and Bundle.from_pretrained(tmp_path / "re").stagger == 2.0
    res = runner.invoke(app, [*args, "--stagger", "-1"])
    assert res.exit_code != 0 and "--stagger -1" in " ".join(res.output.split())
    assert Bundle.from_pretrained(out).stagger == 2.0
