"""Stage `self-forcing`: exit-step gradient truncation in the shared rollout loop, the clean
prefix pin, last-block noise levels, a generator+critic step that moves the student and critic
but never the teacher, same seed → same step, and one run through the real trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.distill.rollout import noise_levels, rollout
from pipeline.stages.self_forcing import SelfForcingStage
from tests.fixtures.distill import PlainEngine, distill_config, make_batch
from tests.test_fidelity import check_fidelity_run

pytestmark = pytest.mark.usefixtures("one_thread")


class Spy:
    """Wraps the student; records (block, commit, σ, grad enabled) for every forward_block."""

    def __init__(self, model) -> None:
        self.model, self.cfg, self.calls = model, model.cfg, []

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, *args):
        return self.model.new_cache(*args)

    def forward_block(self, xv, xa, sv, sa, block, cache, commit=False):
        self.calls.append((block, commit, float(sv[0, 0]), torch.is_grad_enabled()))
        return self.model.forward_block(xv, xa, sv, sa, block, cache, commit)


def _stage(cfg, ctx) -> SelfForcingStage:
    torch.manual_seed(cfg.train.seed)  # as the trainer does: fresh sinks are seeded
    stage = SelfForcingStage()
    stage.build(ctx, lambda net, lr=None, per_step=1: PlainEngine(net, lr or 1e-3))
    return stage


def _text(stage: SelfForcingStage, n: int = 2):
    return stage.teacher.text_encoder(["a red ball"] * n)


def test_only_the_exit_step_keeps_gradient(tiny_teacher_dir: Path, distill_ctx) -> None:
    cfg = distill_config(tiny_teacher_dir, distill={"prefix": "generated"})
    stage = _stage(cfg, distill_ctx(cfg))
    sigmas = stage.sigmas
    for exit_step in range(len(sigmas)):
        spy = Spy(stage.engine.module)
        xv, xa = rollout(spy, _text(stage), 2, sigmas, torch.Generator().manual_seed(0), exit_step)
        assert xv.requires_grad and xa.requires_grad
        for block in range(3):  # prefix + 2 seconds
            calls = [c for c in spy.calls if c[0] == block]
            denoise = [c for c in calls if not c[1]]
            assert [c[2] for c in denoise] == pytest.approx(sigmas[: exit_step + 1])
            assert [c[3] for c in denoise] == [False] * exit_step + [True]
            commits = [c for c in calls if c[1]]
            assert len(commits) == 1 and commits[0][2] == 0.0 and not commits[0][3]


def test_same_seed_same_rollout_and_clean_prefix_pin(tiny_teacher_dir: Path, distill_ctx) -> None:
    cfg = distill_config(tiny_teacher_dir)
    stage = _stage(cfg, distill_ctx(cfg))
    g = torch.Generator().manual_seed(0)
    prefix = (torch.randn(2, 1, 4, 4, 6, generator=g), torch.randn(2, 1, 16, generator=g))
    with torch.no_grad():
        runs = [
            rollout(stage.engine.module, _text(stage), 1, stage.sigmas, torch.Generator().manual_seed(9), 1, prefix)
            for _ in range(2)
        ]  # fmt: skip
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][0][:, :1], prefix[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(runs[0][1][:, :1], prefix[1], atol=1e-5, rtol=1e-5)


def test_last_block_scope_keeps_earlier_frames_clean() -> None:
    sv, sa = noise_levels(torch.tensor([0.4, 0.9]), 7, 51, last=(4, 26))
    assert (sv[:, :4] == 0).all() and (sa[:, :26] == 0).all()
    assert (sv[1, 4:] == 0.9).all() and (sa[0, 26:] == 0.4).all()
    sv, _ = noise_levels(torch.tensor([0.4, 0.9]), 7, 51, last=None)
    assert (sv[0] == 0.4).all()


def test_critic_schedule_runs_on_training_steps(tiny_teacher_dir: Path, distill_ctx) -> None:
    """The critic steps `critic_updates_per_generator` times per training step; its warm-up and
    cosine still span the run's training steps (at its own peak rate), so after every step its
    rate is the student's times critic_lr / lr — not a warm-up 3× as short and a cosine ending at
    a third of the run, as when its scheduler counted its own updates."""
    from pipeline.parallelize import TorchEngine

    train = {"lr": 1e-3, "warmup_steps": 3, "steps": 8, "schedule": "cosine"}
    distill = {"critic_updates_per_generator": 3, "critic_lr": 2e-3}
    cfg = distill_config(tiny_teacher_dir, train=train, distill=distill)
    ctx = distill_ctx(cfg)
    torch.manual_seed(0)
    stage = SelfForcingStage()
    stage.build(ctx, lambda net, lr=None, per_step=1: TorchEngine(net, cfg, lr, per_step))
    batch = make_batch(cfg)
    rates = []
    for step in range(6):
        stage.train_step(step, lambda: batch, ctx)
        student, critic = stage.engine.get_lr()[0], stage.critic.get_lr()[0]
        assert critic == pytest.approx(2 * student, rel=1e-9), step
        rates.append(student)
    assert rates[1] > rates[0] and rates[-1] < max(rates)  # warm-up, then the cosine


@pytest.mark.parametrize("scope", ["last_block", "every_block"])
def test_step_moves_student_and_critic_not_teacher(
    tiny_teacher_dir: Path, distill_ctx, scope: str
) -> None:
    cfg = distill_config(tiny_teacher_dir, distill={"loss_scope": scope})
    ctx = distill_ctx(cfg)
    stage = _stage(cfg, ctx)
    snap = {
        name: {k: v.clone() for k, v in net.state_dict().items()}
        for name, net in [
            ("teacher", stage.real),
            ("student", stage.engine.module),
            ("critic", stage.critic.module),
        ]
    }
    batch = make_batch(cfg)
    out = stage.train_step(1, lambda: batch, ctx)
    for key in ("loss/dmd_video", "loss/dmd_audio", "loss/critic", "grad/out_audio"):
        assert out[key] == out[key] and out[key] >= 0, key  # finite, present
    assert out["grad/param_audio"] > 0 and out["grad/param_video"] > 0

    def changed(name: str, net) -> bool:
        return any(not torch.equal(v, snap[name][k]) for k, v in net.state_dict().items())

    assert not changed("teacher", stage.real)
    assert changed("student", stage.engine.module)
    assert changed("critic", stage.critic.module)
    # Same seed and step on a fresh stage → the same metrics (explicit generators only).
    again = _stage(cfg, ctx).train_step(1, lambda: batch, ctx)
    assert again["loss/dmd_audio"] == out["loss/dmd_audio"]
    assert again["exit_step"] == out["exit_step"]


@pytest.mark.slow
def test_self_forcing_through_real_trainer(
    tiny_teacher_dir: Path, mlflow_uri: str, ray_local: None, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.registry import load_bundle, promote
    from pipeline.trainer import run_stage

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"distill.teacher={tiny_teacher_dir}",
            "distill.critic_updates_per_generator=2",
            f"storage.path={tmp_path / 'runs'}",
            "mlflow.experiment=distill-sf-test",
            "train.steps=2",
            "train.checkpoint_every=2",
            "train.reliance_every=0",
            "train.fidelity.every=1",  # evaluate the student after each step (pipeline/fidelity)
            "train.fidelity.clips=2",
        ],
    )
    result = run_stage(cfg, "self-forcing")
    assert result.step == 2
    client = MlflowClient(mlflow_uri)
    hist = client.get_metric_history(result.run_id, "grad/param_audio")
    assert [m.step for m in hist] == [1, 2] and all(m.value > 0 for m in hist)
    best = check_fidelity_run(client, result.run_id, steps=[0, 1, 2])  # 0: the start
    out = promote(result.run_id, name="sf-student", alias="candidate", tracking_uri=mlflow_uri)
    found = best is not None
    assert out["step"] == (best if found else 2) and out["which"] == ("best" if found else "last")
    bundle = load_bundle("models:/sf-student@candidate")
    assert bundle.config.causal and bundle.config.sinks > 0
    if found:  # the registered weights are the best step's export, named in the description
        ref = load_bundle(f"runs:/{result.run_id}/best/step-{best:08d}")
        for (k, a), (_, b) in zip(
            bundle.model.state_dict().items(), ref.model.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), k
        version = client.get_model_version("sf-student", out["version"])
        start = " (the stage's starting weights)" if best == 0 else ""
        assert version.description.startswith(f"step {best}{start} of run")


def test_artifacts_hook_writes_a_student_sheet(
    tiny_teacher_dir: Path, distill_ctx, tmp_path: Path
) -> None:
    cfg = distill_config(tiny_teacher_dir)
    ctx = distill_ctx(cfg)
    stage = _stage(cfg, ctx)
    stage.artifacts(3, None, ctx)  # non-zero ranks: forwards only, nothing written
    stage.artifacts(3, tmp_path, ctx)
    assert (tmp_path / "student_sheet.png").stat().st_size > 0
    assert (tmp_path / "student.mp4").read_bytes()[4:8] == b"ftyp"  # a playable mp4


def test_per_modality_weights_scale_each_modalitys_gradient(
    tiny_teacher_dir: Path, distill_ctx
) -> None:
    """distill.dmd_weight_{video,audio} weight each modality's DMD term: the student's gradient
    for weights (w_v, w_a) is w_v·∇(1, 0) + w_a·∇(0, 1) (same seed, same rollout)."""

    def grads(w_v: float, w_a: float) -> torch.Tensor:
        cfg = distill_config(
            tiny_teacher_dir, distill={"dmd_weight_video": w_v, "dmd_weight_audio": w_a}
        )
        ctx = distill_ctx(cfg)
        stage = _stage(cfg, ctx)
        stage.engine.step = lambda: None  # keep the gradients for reading
        inp = stage.inputs(make_batch(cfg), ctx)
        stage.generator_update(inp, torch.Generator().manual_seed(3), 1, ctx, norms=False)
        params = stage.engine.module.parameters()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    video, audio, both = grads(1.0, 0.0), grads(0.0, 1.0), grads(2.0, 0.5)
    assert video.norm() > 0 and audio.norm() > 0
    torch.testing.assert_close(both, 2.0 * video + 0.5 * audio, rtol=1e-4, atol=1e-7)
