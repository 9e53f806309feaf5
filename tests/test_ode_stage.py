"""Stage `ode`: roles (student = teacher + fresh sinks), per-block trajectory points shared by
both modalities, the σ>0 mask, the loss going down on fixed trajectories, and one run through
the real trainer (local Ray, 2 workers, DeepSpeed ZeRO-2) whose export `promote` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import BlockLayout
from pipeline.distill import roles
from pipeline.stages.ode import OdeStage, block_points
from tests.fixtures.distill import distill_config, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_student_is_teacher_plus_fresh_sinks(tiny_teacher_dir: Path) -> None:
    cfg = distill_config(tiny_teacher_dir)
    teacher = roles.load_teacher(str(tiny_teacher_dir))
    student = roles.build_role("student", cfg.distill.student, teacher.model, cfg)
    critic = roles.build_role("critic", cfg.distill.critic, teacher.model, cfg)
    assert student.cfg.causal and student.cfg.sinks == teacher.model.cfg.num_sinks
    assert not critic.cfg.causal
    t_state = teacher.model.state_dict()
    for k, v in student.state_dict().items():
        if k == roles.SINK_KEY:
            continue
        assert torch.equal(v, t_state[k]), k
    assert roles.SINK_KEY in student.state_dict() and roles.SINK_KEY not in t_state
    with pytest.raises(ValueError, match="unexpected"):
        roles.load_from_teacher(student, {**t_state, "bogus": torch.zeros(1)}, "distill.student")
    with pytest.raises(ValueError, match="distill.teacher is not set"):
        roles.load_teacher(None)


def test_student_from_a_student_bundle_and_run_id_refs(tiny_teacher_dir: Path, tmp_path) -> None:
    from model.testing import tiny_bundle

    ode_student = tiny_bundle(seed=3, causal=True)
    ode_student.save_pretrained(tmp_path / "ode-student")
    cfg = distill_config(
        tiny_teacher_dir, distill={"student": {"init_from": str(tmp_path / "ode-student")}}
    )
    teacher = roles.load_teacher(str(tiny_teacher_dir))
    student = roles.build_role("student", cfg.distill.student, teacher.model, cfg)
    for k, v in ode_student.model.state_dict().items():  # sinks included: nothing fresh
        assert torch.equal(student.state_dict()[k], v), k
    with pytest.raises(ValueError, match="must be bidirectional"):
        roles.load_teacher(str(tmp_path / "ode-student"))
    rid = "0123456789abcdef0123456789abcdef"
    assert roles.bundle_uri(rid) == f"runs:/{rid}/bundle"
    assert roles.bundle_uri("models:/s@champion") == "models:/s@champion"


def test_block_points_share_state_and_sigma_within_a_block() -> None:
    b, k1, fv, fa = 3, 4, 7, 51  # 2 seconds: blocks of 1+3+3 video, 1+25+25 audio
    sig = torch.tensor([1.0, 0.75, 0.5, 0.0])
    # Trajectory value = its point index, so the chosen index can be read back.
    tv = torch.arange(k1).float().view(1, k1, 1, 1, 1, 1).expand(b, k1, fv, 2, 2, 3).clone()
    ta = torch.arange(k1).float().view(1, k1, 1, 1).expand(b, k1, fa, 5).clone()
    xv, xa, sv, sa = block_points(tv, ta, sig, torch.Generator().manual_seed(0))
    lay = BlockLayout.from_counts(fv, fa)
    seen = set()
    for blk in range(lay.num_blocks):
        v0, v1 = lay.video_range(blk)
        a0, a1 = lay.audio_range(blk)
        for i in range(b):
            idx = int(xv[i, v0, 0, 0, 0])
            seen.add(idx)
            assert (xv[i, v0:v1] == idx).all() and (xa[i, a0:a1] == idx).all()
            assert (sv[i, v0:v1] == sig[idx]).all() and (sa[i, a0:a1] == sig[idx]).all()
    assert len(seen) > 1  # independent draws per block/sample


def test_clean_context_makes_the_blocks_before_one_clean() -> None:
    # distill.ode_clean_context = 1: per sample, the blocks before a random block k are the clean
    # end (σ 0, as the streaming student's committed context), the rest random points.
    b, k1, fv, fa = 64, 4, 13, 101  # 4 seconds: 5 blocks
    sig = torch.tensor([1.0, 0.75, 0.5, 0.0])
    tv = torch.arange(k1).float().view(1, k1, 1, 1, 1, 1).expand(b, k1, fv, 2, 2, 3).clone()
    ta = torch.arange(k1).float().view(1, k1, 1, 1).expand(b, k1, fa, 5).clone()
    lay = BlockLayout.from_counts(fv, fa)
    starts = [lay.video_range(blk)[0] for blk in range(lay.num_blocks)]
    for share, g in ((1.0, 1), (0.0, 1)):
        xv, _, sv, _ = block_points(tv, ta, sig, torch.Generator().manual_seed(g), share)
        per = sv[:, starts]  # [B, blocks] σ of each block
        # Length of each sample's leading run of clean blocks.
        lead = (per == 0).int().cumprod(1).sum(1)
        if share == 1.0:
            assert lead.float().mean() > 1.5  # k uniform over 5 blocks: ≥ 2 on average
        else:
            assert lead.float().mean() < 1.0  # each block clean with p 1/4 only
        assert (xv[:, starts, 0, 0, 0][per == 0] == 3).all()  # σ 0 is the trajectory's end


def _stage(cfg, ctx) -> tuple[OdeStage, torch.nn.Module]:
    stage = OdeStage()
    stage.teacher = roles.load_teacher(cfg.distill.teacher)
    stage._traj = {}
    return stage, roles.build_role("student", cfg.distill.student, stage.teacher.model, cfg)


def test_ode_loss_decreases_on_fixed_trajectories(tiny_teacher_dir: Path, distill_ctx) -> None:
    cfg = distill_config(tiny_teacher_dir)
    ctx = distill_ctx(cfg)
    stage, student = _stage(cfg, ctx)
    batch = make_batch(cfg)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)

    def losses() -> torch.Tensor:
        lv, la = stage.losses(student, batch, torch.Generator().manual_seed(5), ctx)
        return lv + la

    first = losses().item()
    assert len(stage._traj) == 2  # local teacher's trajectories are memoised per key
    for _ in range(5):
        opt.zero_grad()
        losses().backward()
        opt.step()
    assert losses().item() < 0.7 * first


def test_trajectory_columns_are_used_and_mode_checked(tiny_teacher_dir: Path, distill_ctx) -> None:
    cfg = distill_config(tiny_teacher_dir, distill={"teacher_mode": "actors"})
    ctx = distill_ctx(cfg)
    stage, student = _stage(cfg, ctx)
    batch = make_batch(cfg)
    with pytest.raises(ValueError, match="no traj_video"):
        stage.losses(student, batch, torch.Generator().manual_seed(0), ctx)
    tv = torch.zeros(2, 4, 4, 4, 4, 6)  # [B, K+1, Fv, h, w, C]; clean end at index -1
    ta = torch.zeros(2, 4, 26, 16)
    batch |= {
        "traj_video": tv.numpy(),
        "traj_audio": ta.numpy(),
        "traj_sigmas": torch.tensor([[1.0, 0.75, 0.5, 0.0]] * 2).numpy(),
    }
    lv, la = stage.losses(student, batch, torch.Generator().manual_seed(0), ctx)
    assert torch.isfinite(lv) and torch.isfinite(la)


@pytest.mark.slow
def test_ode_stage_through_real_trainer(
    tiny_teacher_dir: Path, mlflow_uri: str, ray_local: None, tmp_path: Path
) -> None:
    from model import Bundle
    from pipeline.config import load_config
    from pipeline.registry import promote
    from pipeline.trainer import run_stage

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"distill.teacher={tiny_teacher_dir}",
            "distill.teacher_steps=4",
            f"storage.path={tmp_path / 'runs'}",
            "mlflow.experiment=distill-ode-test",
            "train.steps=2",
            "train.checkpoint_every=2",
            "train.reliance_every=0",
        ],
    )
    result = run_stage(cfg, "ode")
    assert result.step == 2
    out = promote(result.run_id, name="ode-student", alias="candidate", tracking_uri=mlflow_uri)
    assert out["run_id"] == result.run_id
    from pipeline.registry import load_bundle

    bundle: Bundle = load_bundle("models:/ode-student@candidate")
    assert bundle.config.causal and bundle.config.sinks > 0
