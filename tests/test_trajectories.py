"""Teacher trajectories: σ points (student list + clean end) on the Euler path, per-row seeds
independent of batching, trajectory shards (round trip, keyed folder, clear errors), and the real
Ray actor pool (map_batches over ActorPoolStrategy) streaming and caching trajectories."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.distill import roles
from pipeline.distill import trajectories as tr
from pipeline.distill import trajectory_shards as shards
from tests.fixtures.distill import distill_config, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")
STUDENT = [1.0, 0.7507, 0.5448]


def test_merged_schedule_contains_student_points() -> None:
    sched = tr.merged_schedule(STUDENT, 8, 42)
    assert sched[0] == 1.0 and sched[-1] == 0.0
    assert all(a > b for a, b in zip(sched, sched[1:], strict=False))
    for s in STUDENT:
        assert min(abs(s - x) for x in sched) < 1e-6


def _traj(bundle, captions, seeds):
    return tr.teacher_trajectory(
        bundle.model, bundle.text_encoder, captions, seeds, ((4, 4, 4, 6), (26, 16)), STUDENT, 6
    )


def test_trajectory_points_and_seed_independence(tiny_teacher_dir: Path) -> None:
    bundle = roles.load_teacher(str(tiny_teacher_dir))
    tv, ta, sig = _traj(bundle, ["a red ball", "a blue ball"], [11, 12])
    assert tv.shape == (2, 4, 4, 4, 4, 6) and ta.shape == (2, 4, 26, 16)
    assert sig.tolist() == pytest.approx(STUDENT + [0.0])
    # σ = 1 point is the row's own noise; a row alone gives the same path as in a batch.
    noise = torch.randn((4, 4, 4, 6), generator=torch.Generator().manual_seed(12))
    assert torch.equal(tv[1, 0], noise)
    tv1, ta1, _ = _traj(bundle, ["a blue ball"], [12])
    torch.testing.assert_close(tv1[0], tv[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ta1[0], ta[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tv[0, -1], tv[0, 0])  # the teacher moved it


def test_bf16_teacher_integrates_in_fp32(tiny_teacher_dir: Path) -> None:
    # A GPU actor's teacher is bf16; the ODE state must not be: the σ = 1 point is the exact fp32
    # noise (a bf16 state would round it) and the path stays near the fp32 teacher's.
    ref_v, ref_a, _ = _traj(roles.load_teacher(str(tiny_teacher_dir)), ["a red ball"], [12])
    bundle = roles.load_teacher(str(tiny_teacher_dir))
    bundle.model.to(torch.bfloat16)
    tv, ta, _ = _traj(bundle, ["a red ball"], [12])
    assert tv.dtype == ta.dtype == torch.float32
    assert torch.equal(tv[:, 0], ref_v[:, 0]) and torch.equal(ta[:, 0], ref_a[:, 0])
    torch.testing.assert_close(tv, ref_v, atol=0.05, rtol=0.0)  # bf16 network rounding only
    torch.testing.assert_close(ta, ref_a, atol=0.05, rtol=0.0)
    xv, xa = tv[:, 1], ta[:, 1]  # guided_x0: fp32 in, fp32 out, the DiT in bf16
    sv, sa = torch.full((1, 4), STUDENT[1]), torch.full((1, 26), STUDENT[1])
    enc = bundle.text_encoder
    x0v, x0a = tr.guided_x0(bundle.model, xv, xa, sv, sa, enc(["a"]), enc([""]), (3.0, 5.0))
    assert x0v.dtype == x0a.dtype == torch.float32


def _rows(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "key": f"clip{i:03d}",
            "caption": f"a red ball {i}",
            "video": torch.randn(4, 4, 4, 6, generator=g).numpy(),
            "audio": torch.randn(26, 16, generator=g).numpy(),
            "traj_video": torch.randn(4, 4, 4, 4, 6, generator=g).numpy(),
            "traj_audio": torch.randn(4, 26, 16, generator=g).numpy(),
            "traj_sigmas": np.array(STUDENT + [0.0], dtype=np.float32),
        }
        for i in range(n)
    ]


def test_shards_round_trip_keyed_and_atomic(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    fp = shards.teacher_fingerprint(tiny_teacher_dir)
    assert len(fp) == 64
    assert shards.teacher_fingerprint(tiny_teacher_dir.parent) == fp  # found inside a folder too
    out = shards.trajectory_dir(tmp_path, fp, STUDENT)
    assert out.parent.name == f"teacher-{fp[:16]}" and "0.7507" in out.name
    rows = _rows()
    shards.write_trajectory_shards(rows, out, per_shard=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp folder left behind
    back = list(shards.read_trajectory_shards(out))
    assert [r["key"] for r in back] == [r["key"] for r in rows]
    for a, b in zip(back, rows, strict=True):
        assert a["caption"] == b["caption"]
        for k in ("video", "traj_video", "traj_audio", "traj_sigmas"):
            assert np.array_equal(a[k], b[k]), k
    with tarfile.open(out / "shard-000001.tar") as t:
        assert sorted(t.getnames()) == ["clip002.json", "clip002.safetensors"]


def test_shard_errors_name_the_problem(tmp_path: Path) -> None:
    bad = _rows(1)
    bad[0]["key"] = "clip.0"
    with pytest.raises(ValueError, match="clip.0"):
        shards.write_trajectory_shards(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = shards.write_trajectory_shards(_rows(1), tmp_path / "y")
    with tarfile.open(out / "shard-000000.tar", "w") as t:  # a corrupt safetensors member
        shards._member(t, "clip000.safetensors", b"not safetensors")
        shards._member(t, "clip000.json", b'{"caption": "x"}')
    with pytest.raises(ValueError, match=r"shard-000000.tar: sample 'clip000'"):
        list(shards.read_trajectory_shards(out))


@pytest.mark.slow
def test_actor_pool_streams_and_caches(
    tiny_teacher_dir: Path, ray_local: None, tmp_path: Path
) -> None:
    import ray.data

    from data.ray_data import configure_context

    cfg = distill_config(
        tiny_teacher_dir,
        distill={"teacher_mode": "actors", "teacher_steps": 4, "trajectory_cache": str(tmp_path)},
    )
    batch = make_batch(cfg, 3)
    items = [{k: batch[k][i] for k in batch} for i in range(3)]
    # A dataset built under an earlier caller's short wait (as after test_ray_data's unschedulable
    # pool) must still get this config's wait: a dataset keeps its own copy of the context.
    configure_context(5.0)
    ds = ray.data.from_items(items)
    scoring = tr.score_dataset(ds, cfg)
    assert scoring.context.wait_for_min_actors_s == cfg.data.actor_start_timeout_s
    scored = sorted(scoring.take_all(), key=lambda r: r["key"])
    bundle = roles.load_teacher(str(tiny_teacher_dir))
    seeds = [tr.row_seed(str(r["key"]), cfg.train.seed) for r in scored]
    tv, ta, _ = tr.teacher_trajectory(
        bundle.model, bundle.text_encoder, [str(r["caption"]) for r in scored], seeds,
        ((4, 4, 4, 6), (26, 16)), STUDENT, 4, (cfg.distill.ode_cfg_video, cfg.distill.ode_cfg_audio),
    )  # fmt: skip
    np.testing.assert_allclose(np.stack([r["traj_video"] for r in scored]), tv.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.stack([r["traj_audio"] for r in scored]), ta.numpy(), atol=1e-5)
    # Cached: the first call writes shards under the teacher's fingerprint, the second reuses them.
    first = shards.cached_trajectories(ds, cfg).take_all()
    fp = shards.teacher_fingerprint(tiny_teacher_dir)
    tag = shards.data_tag(cfg)
    out = shards.trajectory_dir(tmp_path, fp, STUDENT, shards.sampler_tag(cfg.distill), tag)
    assert out.name.endswith("-steps4-cfg3_5")  # teacher steps and CFG scales key the cache
    assert out.parent.name == tag and tag.startswith("data-")
    # Another seed (each row's noise) or another dataset must not be handed these rows.
    reseeded = distill_config(tiny_teacher_dir, train={"seed": 1})
    moved = distill_config(tiny_teacher_dir, data={"path": str(tmp_path / "other")})
    fewer = distill_config(tiny_teacher_dir, data={"clips": 2})
    tags = {tag, *(shards.data_tag(c) for c in (reseeded, moved, fewer))}
    assert len(tags) == 4
    stamp = (out / "index.json").stat().st_mtime_ns
    second = shards.cached_trajectories(ds, cfg).take_all()
    assert (out / "index.json").stat().st_mtime_ns == stamp
    assert (
        sorted(r["key"] for r in first)
        == sorted(r["key"] for r in second)
        == [str(r["key"]) for r in scored]
    )
