"""Causal teacher trajectories (`distill.teacher_trajectory: causal`): each block's clean end is
made seeing only its clean past, so it does not move with the later blocks' noise (a joint
sample's does: what a causal student cannot see); the rows are its reflow line, and the cache
keys the kind apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import BlockLayout, flow
from model.guidance import teacher_velocity
from pipeline.config import ConfigError
from pipeline.distill import roles
from pipeline.distill import trajectories as tr
from pipeline.distill import trajectory_shards as shards
from tests.fixtures.distill import distill_config

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = ((7, 4, 4, 6), (51, 16))  # 2 seconds: blocks of 1 + 3 + 3 video, 1 + 25 + 25 audio


@torch.no_grad()
def test_a_causal_end_does_not_move_with_later_noise(tiny_teacher_dir: Path) -> None:
    b = roles.load_teacher(str(tiny_teacher_dir))
    text, null = b.text_encoder(["a red ball"]), b.text_encoder([""])

    def velocity(xv, xa, sv, sa):
        return teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0))

    g = torch.Generator().manual_seed(3)
    nv, na = flow.randn((1, *SHAPES[0]), g), flow.randn((1, *SHAPES[1]), g)
    lay = BlockLayout.from_counts(SHAPES[0][0], SHAPES[1][0])
    lv, la = (
        torch.as_tensor(lay.video_block_ids()) == 2,
        torch.as_tensor(lay.audio_block_ids()) == 2,
    )
    nv2, na2 = nv.clone(), na.clone()  # other noise for the last block only
    nv2[:, lv], na2[:, la] = flow.randn(nv2[:, lv].shape, g), flow.randn(na2[:, la].shape, g)
    table = flow.ltx2_sigmas(4, 42)
    ev, ea = tr.causal_ends(velocity, nv, na, table)
    ev2, ea2 = tr.causal_ends(velocity, nv2, na2, table)
    torch.testing.assert_close(ev[:, ~lv], ev2[:, ~lv], atol=1e-6, rtol=0)
    torch.testing.assert_close(ea[:, ~la], ea2[:, ~la], atol=1e-6, rtol=0)
    assert (ev[:, lv] - ev2[:, lv]).abs().max() > 1e-3  # the last block follows its own noise
    assert (ev - nv).abs().max() > 1e-2  # the teacher moved every block
    # The joint sample of the same two noises: its earlier blocks do move.
    jv, _ = flow.euler_sample_staggered(velocity, nv, na, table, 0.0)
    jv2, _ = flow.euler_sample_staggered(velocity, nv2, na2, table, 0.0)
    assert (jv[:, ~lv] - jv2[:, ~lv]).abs().max() > 1e-3


@torch.no_grad()
def test_causal_rows_are_the_reflow_line_of_the_causal_end(tiny_teacher_dir: Path) -> None:
    b = roles.load_teacher(str(tiny_teacher_dir))
    student = [1.0, 0.5]
    args = (["a red ball"], [7], SHAPES, student, 4, (3.0, 5.0))
    tv, ta, sig = tr.teacher_trajectory(b.model, b.text_encoder, *args, causal=True)
    assert sig.tolist() == [1.0, 0.5, 0.0]
    nv, na = tv[:, 0], ta[:, 0]
    assert torch.equal(nv[0], flow.randn(SHAPES[0], torch.Generator().manual_seed(7)))
    text, null = b.text_encoder(["a red ball"]), b.text_encoder([""])

    def velocity(xv, xa, sv, sa):
        return teacher_velocity(b.model, xv, xa, sv, sa, text, null, (3.0, 5.0))

    n_tokens = SHAPES[0][0] * b.model.cfg.video_tokens_per_frame + SHAPES[1][0]
    ev, ea = tr.causal_ends(velocity, nv, na, flow.ltx2_sigmas(4, n_tokens))
    torch.testing.assert_close(tv[:, -1], ev), torch.testing.assert_close(ta[:, -1], ea)
    torch.testing.assert_close(tv[:, 1], 0.5 * ev + 0.5 * nv)
    joint = tr.teacher_trajectory(b.model, b.text_encoder, *args)
    assert (joint[0][:, -1] - ev).abs().max() > 1e-3


def test_the_trajectory_kind_keys_the_cache_and_is_checked(tiny_teacher_dir: Path) -> None:
    joint = distill_config(tiny_teacher_dir)
    causal = distill_config(tiny_teacher_dir, distill={"teacher_trajectory": "causal"})
    assert shards.sampler_tag(causal.distill) == shards.sampler_tag(joint.distill) + "-causal"
    with pytest.raises(ConfigError, match="distill.teacher_trajectory"):
        distill_config(tiny_teacher_dir, distill={"teacher_trajectory": "sideways"})
