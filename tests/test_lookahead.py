"""`model.noise_lookahead`: a causal student that sees, beside each latent, the noise its next
block starts from (issue 23: a joint teacher's sample of block k moves with block k+1's noise,
benchmarks/future_noise.py). Which latent sees which noise; streaming (noise drawn one block
ahead) gives the full-sequence forward's numbers, plain and through GraphedStream; the zero-
initialised projection starts the student as its teacher; the ODE stage feeds the row's noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import AVDiT, BlockLayout, flow
from model.graphs import GraphedStream
from model.layout import next_block_noise
from model.streaming import rollout_blocks
from model.testing import tiny_config
from pipeline.distill import roles
from pipeline.stages.ode import OdeStage
from tests.fixtures.distill import distill_config, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(seed: int = 0, arch: str = "omniforcing") -> AVDiT:
    torch.manual_seed(seed)
    net = AVDiT(tiny_config(arch, causal=True).replace(noise_lookahead=True)).eval()
    for io in (net.video_io, net.audio_io):  # trained-looking: the look-ahead matters
        torch.nn.init.normal_(io.ahead.weight, std=0.3)
    return net


def test_each_latent_sees_its_next_blocks_noise_at_the_same_place() -> None:
    lay = BlockLayout(3, video_block=3, audio_block=25)  # video 1 + 3·3, audio 1 + 25·3
    assert lay.ahead_ids().tolist() == [1, 4, 5, 6, 7, 8, 9, -1, -1, -1]
    ids = lay.ahead_ids(audio=True)
    assert ids[0] == 1 and ids[1] == 26 and ids[25] == 50 and (ids[51:] == -1).all()
    nv = torch.randn(2, lay.num_video, 2, 2, 3)
    na = torch.randn(2, lay.num_audio, 4)
    av, aa = next_block_noise(nv, na)
    assert torch.equal(av[:, 0], nv[:, 1]) and torch.equal(av[:, 1:4], nv[:, 4:7])
    assert torch.equal(aa[:, 26:51], na[:, 51:76])
    assert not av[:, 7:].any() and not aa[:, 51:].any()  # the last block: nothing after it
    with pytest.raises(ValueError, match="do not fit the block layout"):
        next_block_noise(nv[:, :5], na)


def _clip_noise(cfg, seconds: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise `rollout_blocks` draws for a one-step σ list, block after block."""
    g = torch.Generator().manual_seed(seed)
    lay, (h, w) = BlockLayout(seconds), cfg.video_latent_hw
    vs, as_ = [], []
    for k in range(lay.num_blocks):
        (v0, v1), (a0, a1) = lay.video_range(k), lay.audio_range(k)
        vs.append(flow.randn((1, v1 - v0, h, w, cfg.video.latent_channels), g))
        as_.append(flow.randn((1, a1 - a0, cfg.audio.latent_channels), g))
    return torch.cat(vs, 1), torch.cat(as_, 1)


def _full_sequence(net: AVDiT, nv, na, text, ahead):
    """Block by block with full block-causal forwards: the clean past at σ 0, block k from noise."""
    lay = BlockLayout.from_counts(nv.shape[1], na.shape[1])
    vid, aid = lay.video_block_ids(), lay.audio_block_ids()
    out_v, out_a = torch.zeros_like(nv), torch.zeros_like(na)
    for k in range(lay.num_blocks):
        sv, sa = torch.where(vid < k, 0.0, 1.0)[None], torch.where(aid < k, 0.0, 1.0)[None]
        xv = torch.where((vid < k)[None, :, None, None, None], out_v, nv)
        xa = torch.where((aid < k)[None, :, None], out_a, na)
        vv, va = net(xv, xa, sv, sa, text, None, ahead=ahead)
        out_v[:, vid == k] = flow.x0_from_velocity(xv, vv, sv)[:, vid == k]
        out_a[:, aid == k] = flow.x0_from_velocity(xa, va, sa)[:, aid == k]
    return out_v, out_a


@pytest.mark.parametrize(
    ("arch", "graphed"), [("omniforcing", False), ("omniforcing", True), ("ltx2", False)]
)
def test_streaming_draws_one_block_ahead_and_equals_the_full_forward(arch, graphed) -> None:
    net, seconds = _student(arch=arch), 3
    text = torch.randn(1, 5, net.cfg.text_dim)
    if graphed:  # the static-buffer path (CUDA graphs on a GPU, eager here) carries `ahead` too
        view = GraphedStream(net, (5, 5), text_len=5)
        cache = view.reset(text, torch.ones(1, 5, dtype=torch.bool))
    else:
        view, cache = net, net.new_cache(text, None, seconds)
    with torch.no_grad():
        blocks = list(rollout_blocks(view, cache, seconds, [1.0], torch.Generator().manual_seed(4)))
        sv = torch.cat([b[1].clone() for b in blocks], 1)
        sa = torch.cat([b[2].clone() for b in blocks], 1)
        nv, na = _clip_noise(net.cfg, seconds, 4)
        fv, fa = _full_sequence(net, nv, na, text, next_block_noise(nv, na))
        # The noise ahead is an input that matters: other noise ahead, other blocks.
        other = next_block_noise(torch.randn_like(nv), torch.randn_like(na))
        ov, _ = _full_sequence(net, nv, na, text, other)
    torch.testing.assert_close(sv, fv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa, fa, rtol=1e-5, atol=1e-5)
    assert (ov[:, :1] - fv[:, :1]).abs().max() > 1e-2  # the prefix moved with block 1's noise


def test_a_lookahead_model_needs_the_noise_ahead() -> None:
    net = _student()
    lay = BlockLayout(1)
    h, w = net.cfg.video_latent_hw
    v = torch.randn(1, lay.num_video, h, w, net.cfg.video.latent_channels)
    a = torch.randn(1, lay.num_audio, net.cfg.audio.latent_channels)
    s_v, s_a = torch.ones(1, lay.num_video), torch.ones(1, lay.num_audio)
    with pytest.raises(ValueError, match="needs `ahead`"):
        net(v, a, s_v, s_a, torch.randn(1, 5, net.cfg.text_dim))


def test_student_starts_as_its_teacher_and_the_ode_stage_feeds_the_rows_noise(
    tiny_teacher_dir: Path, distill_ctx
) -> None:
    cfg = distill_config(
        tiny_teacher_dir, model={"noise_lookahead": True}, distill={"teacher_mode": "actors"}
    )
    plain = distill_config(tiny_teacher_dir, distill={"teacher_mode": "actors"})
    teacher = roles.load_teacher(str(tiny_teacher_dir))
    look = roles.build_role("student", cfg.distill.student, teacher.model, cfg)
    base = roles.build_role("student", plain.distill.student, teacher.model, plain)
    assert look.cfg.noise_lookahead and not base.cfg.noise_lookahead
    assert not look.video_io.ahead.weight.any()  # zero-initialised, not loaded
    missing, _ = look.load_state_dict(base.state_dict(), strict=False)  # the same fresh sinks
    assert sorted(missing) == [
        f"{s}_io.ahead.{p}" for s in ("audio", "video") for p in ("bias", "weight")
    ]
    stage, batch = OdeStage(), make_batch(cfg)
    stage.teacher = teacher
    g = torch.Generator().manual_seed(1)
    traj_v = torch.randn(2, 4, 4, 4, 4, 6, generator=g)  # [B, K+1, Fv, h, w, C]
    traj_a = torch.randn(2, 4, 26, 16, generator=g)
    batch |= {
        "traj_video": traj_v.numpy(),
        "traj_audio": traj_a.numpy(),
        "traj_sigmas": torch.tensor([[1.0, 0.75, 0.5, 0.0]] * 2).numpy(),
    }

    def loss(net, c) -> float:
        lv, la = stage.losses(net, batch, torch.Generator().manual_seed(0), distill_ctx(c))
        return float((lv + la).detach())

    assert loss(look, cfg) == pytest.approx(loss(base, plain), rel=1e-6)  # = its teacher's init
    torch.nn.init.normal_(look.video_io.ahead.weight, std=0.3)
    first = loss(look, cfg)
    batch["traj_video"][:, 0] = torch.randn(2, 4, 4, 4, 6, generator=g).numpy()  # other noise
    assert loss(look, cfg) != pytest.approx(first, rel=1e-4)  # …reaches the student's input


def test_a_lookahead_bundle_into_a_plain_student_names_the_key(tiny_teacher_dir, tmp_path):
    from model.testing import tiny_bundle

    b = tiny_bundle(seed=2)
    b.model = _student()
    b.save_pretrained(tmp_path / "look")
    cfg = distill_config(
        tiny_teacher_dir, distill={"student": {"init_from": str(tmp_path / "look")}}
    )
    teacher = roles.load_teacher(str(tiny_teacher_dir))
    with pytest.raises(ValueError, match="set model.noise_lookahead true"):
        roles.build_role("student", cfg.distill.student, teacher.model, cfg)
    cfg = distill_config(
        tiny_teacher_dir,
        model={"noise_lookahead": True},
        distill={"student": {"init_from": str(tmp_path / "look")}},
    )
    net = roles.build_role("student", cfg.distill.student, teacher.model, cfg)
    assert torch.equal(net.video_io.ahead.weight, b.model.video_io.ahead.weight)
