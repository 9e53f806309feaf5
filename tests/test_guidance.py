"""Autoguidance (model.guidance): its maths, a bundle that ships a guide (fp16 on disk, checksums),
`omniforcing export --guide`, and every teacher sampler using the guide its bundle carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model.bundle import GUIDE_FILES, Bundle, BundleError
from model.guidance import Guide, teacher_velocity
from model.sampling import sample_teacher
from model.testing import tiny_bundle
from pipeline.checkpoint import FORMAT_VERSION, META
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.distill.real_score import RealScoreActor
from pipeline.distill.trajectories import guided_x0, teacher_trajectory

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _teacher(seed: int, guide_seed: int | None = None, weight: float = 1.0) -> Bundle:
    b = tiny_bundle(seed=seed, causal=False)
    if guide_seed is not None:
        g = tiny_bundle(seed=guide_seed, causal=False)
        b.guide = Guide(g.model, g.text_encoder, weight)
    return b


def _inputs(b: Bundle, batch: int = 2):
    cfg, g = b.config, torch.Generator().manual_seed(3)
    xv = torch.randn(batch, 4, *cfg.video_latent_hw, cfg.video.latent_channels, generator=g)
    xa = torch.randn(batch, 26, cfg.audio.latent_channels, generator=g)
    sv, sa = torch.rand(batch, 4, generator=g), torch.rand(batch, 26, generator=g)
    return xv, xa, sv, sa


PROMPTS = ["a red ball", "a small blue ball"]


@torch.no_grad()
def test_velocity_is_cfg_plus_weighted_distance_from_the_guide():
    b = _teacher(1, guide_seed=2, weight=0.7)
    xv, xa, sv, sa = _inputs(b)
    text, null = b.text_encoder(PROMPTS), b.text_encoder([""])
    got = teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0), b.guide.bind(PROMPTS))
    c = b.model(xv, xa, sv, sa, *text)
    u = b.model(xv, xa, sv, sa, *b.text_encoder(["", ""]))
    w = b.guide.model(xv, xa, sv, sa, *b.guide.text_encoder(PROMPTS))
    for i, scale in enumerate((3.0, 5.0)):
        want = c[i] + (scale - 1) * (c[i] - u[i]) + 0.7 * (c[i] - w[i])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)
    # Weight 0, or no guide: plain CFG, and the guide does change the velocity.
    plain = teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0))
    b.guide.weight = 0.0
    zero = teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0), b.guide.bind(PROMPTS))
    for p, z, g in zip(plain, zero, got, strict=True):
        torch.testing.assert_close(p, z, rtol=0, atol=0)
        assert (p - g).abs().max() > 1e-3


def test_bundle_ships_its_guide_in_fp16_and_the_checksum_guards_it(tmp_path):
    b = _teacher(1, guide_seed=2, weight=1.5)
    b.save_pretrained(tmp_path / "t", weights_dtype=torch.float16)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert cfg["guide"]["weight"] == 1.5 and set(GUIDE_FILES) <= set(manifest)
    c = Bundle.from_pretrained(tmp_path / "t")
    assert c.guide is not None and c.guide.weight == 1.5
    for src, dst in ((b.model, c.model), (b.guide.model, c.guide.model)):
        for (k, p), q in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
            assert q.dtype == torch.float32, k  # fp16 on disk, fp32 once loaded
            torch.testing.assert_close(q, p.half().float(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in c.guide.model.parameters())
    # A modified guide fails clearly; a missing one too.
    path = tmp_path / "t" / GUIDE_FILES[0]
    good = path.read_bytes()
    blob = bytearray(good)
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="guide.safetensors: checksum"):
        Bundle.from_pretrained(tmp_path / "t")
    path.write_bytes(good)
    (tmp_path / "t" / GUIDE_FILES[1]).unlink()
    with pytest.raises(BundleError, match="guide_text.safetensors missing"):
        Bundle.from_pretrained(tmp_path / "t")


def test_samplers_use_the_guide_their_bundle_ships(tmp_path):
    """sample_teacher, the ODE trajectories and the DMD real score actor all follow the guide:
    same seed → same clip; the guide changes it; a loaded bundle samples as the one saved."""
    guided, plain = _teacher(1, guide_seed=2), _teacher(1)

    def clip(b):
        g = torch.Generator().manual_seed(5)
        return sample_teacher(b.model, b.text_encoder, PROMPTS[:1], 1, g, steps=4, guide=b.guide)

    a, again, base = clip(guided), clip(guided), clip(plain)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(a, base, strict=True))
    guided.save_pretrained(tmp_path / "t")
    loaded = Bundle.from_pretrained(tmp_path / "t")
    assert all(torch.equal(x, y) for x, y in zip(a, clip(loaded), strict=True))

    shapes = ((4, *guided.config.video_latent_hw, 6), (26, guided.config.audio.latent_channels))
    args = (PROMPTS, [7, 8], shapes, [1.0, 0.5], 4, (3.0, 5.0))
    with torch.no_grad():
        tg = teacher_trajectory(guided.model, guided.text_encoder, *args, guide=guided.guide)
        tp = teacher_trajectory(plain.model, plain.text_encoder, *args)
    assert (tg[0][:, -1] - tp[0][:, -1]).abs().max() > 1e-3

    xv, xa, sv, sa = _inputs(guided)
    actor = RealScoreActor(str(tmp_path / "t"))
    got = actor.x0(xv.numpy(), xa.numpy(), sv.numpy(), sa.numpy(), PROMPTS, (3.0, 5.0))
    with torch.no_grad():
        text, null = guided.text_encoder(PROMPTS), guided.text_encoder([""])
        want = guided_x0(
            guided.model, xv, xa, sv, sa, text, null, (3.0, 5.0), guided.guide.bind(PROMPTS)
        )
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(torch.as_tensor(x), y, rtol=1e-4, atol=1e-5)


def test_trajectory_cache_key_covers_the_guide(tmp_path):
    """Cached ODE rows are keyed by what the teacher samples with: the same weights with a guide,
    or with another guide weight, are another teacher; without a guide the key is unchanged."""
    from pipeline.distill.trajectory_shards import teacher_fingerprint

    plain = _teacher(1)
    plain.save_pretrained(tmp_path / "plain")
    keys = {"plain": teacher_fingerprint(tmp_path / "plain")}
    for w in (1.0, 2.0):
        _teacher(1, guide_seed=2, weight=w).save_pretrained(tmp_path / f"g{w}")
        keys[w] = teacher_fingerprint(tmp_path / f"g{w}")
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert keys["plain"] == manifest["model.safetensors"]
    assert len(set(keys.values())) == 3


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long error lines


def test_self_forcing_local_real_score_follows_the_guide(tmp_path, distill_ctx):
    """The Self-Forcing stage's local DMD real score is the autoguided teacher's x0 (its guide
    encoded once per batch, in `inputs`); the same teacher without its guide scores otherwise."""
    from pipeline.distill import roles
    from pipeline.stages.self_forcing import SelfForcingStage
    from tests.fixtures.distill import PlainEngine, distill_config, make_batch

    _teacher(0, guide_seed=2, weight=1.0).save_pretrained(tmp_path / "guided")
    _teacher(0).save_pretrained(tmp_path / "plain")
    scores = {}
    for name in ("guided", "plain"):
        cfg = distill_config(tmp_path / name)
        ctx = distill_ctx(cfg)
        stage = SelfForcingStage()
        stage.build(ctx, lambda net, lr=None, per_step=1: PlainEngine(net, lr or 1e-3))
        batch = make_batch(cfg, 2)
        inp = stage.inputs(batch, ctx)
        xv, xa, captions, _ = roles.batch_latents(batch, ctx.device, ctx.dtype)
        sv, sa = torch.full(xv.shape[:2], 0.6), torch.full(xa.shape[:2], 0.6)
        with torch.no_grad():
            scores[name] = stage.real_score(xv, xa, sv, sa, inp)
    teacher = Bundle.from_pretrained(tmp_path / "guided")
    with torch.no_grad():
        text, null = teacher.text_encoder(captions), teacher.text_encoder([""])
        want = guided_x0(
            teacher.model, xv, xa, sv, sa, text, null, stage.scales, teacher.guide.bind(captions)
        )
    for got, ref, plain in zip(scores["guided"], want, scores["plain"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert (got - plain).abs().max() > 1e-3


def _checkpoint(d: Path, seed: int, step: int) -> Path:
    """A teacher checkpoint folder as the trainer writes it (meta.json + rank-0 EMA weights)."""
    from safetensors.torch import save_file

    from model import AVDiT
    from pipeline.stages.teacher import TeacherNet, build_text_encoder

    cfg = load_config(CONFIG, [])
    mcfg = cfg.build_model_config(causal=False)
    torch.manual_seed(seed)
    net = TeacherNet(AVDiT(mcfg), build_text_encoder(cfg, mcfg.text_dim))
    (d / "ema").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        d / "ema" / "teacher-rank0.safetensors",
    )
    meta = {"format": FORMAT_VERSION, "step": step, "config": cfg.to_dict(), "stage": "teacher"}
    (d / META).write_text(json.dumps(meta))
    return d


def test_export_cli_attaches_a_guide_and_refuses_bad_input(tmp_path):
    main = _checkpoint(tmp_path / "step-9", seed=1, step=9)
    early = _checkpoint(tmp_path / "step-5", seed=2, step=5)
    runner = CliRunner()
    out = tmp_path / "bundle"
    args = ["export", "--checkpoint", str(main), "--out", str(out), "--guide", str(early)]
    res = runner.invoke(app, [*args, "--guide-weight", "0.5", "--weights-dtype", "float16"])
    assert res.exit_code == 0, res.output
    b = Bundle.from_pretrained(out)
    extra = json.loads((out / "config.json").read_text())["extra"]
    assert b.guide.weight == 0.5 and extra["step"] == 9 and extra["guide"]["step"] == 5
    assert extra["weights_dtype"] == "float16"
    assert (out / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in b.model.parameters()
    )
    res = runner.invoke(app, [*args, "--weights-dtype", "float8"])
    assert res.exit_code != 0 and "--weights-dtype 'float8'" in _flat(res.output)
    res = runner.invoke(app, [*args[:-1], str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "neither a teacher checkpoint nor a bundle" in _flat(res.output)
    # The bundle written first is still whole after the refused exports.
    assert Bundle.from_pretrained(out).guide.weight == 0.5
    # A teacher bundle re-exports (keeping its guide); a causal student is refused.
    again = tmp_path / "again"
    res = runner.invoke(app, ["export", "--checkpoint", str(out), "--out", str(again)])
    assert res.exit_code == 0, res.output
    b2 = Bundle.from_pretrained(again)
    extra2 = json.loads((again / "config.json").read_text())["extra"]
    assert b2.guide.weight == 0.5 and extra2["step"] == 9 and extra2["guide"]["step"] == 5
    assert extra2["weights_dtype"] == "float32"
    first, second = b.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # fp16 weights widen losslessly
    student = tiny_bundle(causal=True)
    student.save_pretrained(tmp_path / "student")
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "student"), "--out", "x"])
    assert res.exit_code != 0 and "a causal (student) bundle" in _flat(res.output)


def test_a_guide_of_other_latents_is_refused(tmp_path):
    main = _checkpoint(tmp_path / "step-9", seed=1, step=9)
    other = tiny_bundle(causal=False, preset_name="demo")
    other.save_pretrained(tmp_path / "demo")
    res = CliRunner().invoke(
        app,
        [
            "export",
            "--checkpoint",
            str(main),
            "--out",
            str(tmp_path / "b"),
            "--guide",
            str(tmp_path / "demo"),
        ],
    )
    assert res.exit_code != 0 and "a guide must denoise the same latents" in _flat(res.output)
    assert not (tmp_path / "b").exists()
