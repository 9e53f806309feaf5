"""Self-Forcing's real score on the teacher actor pool (`distill.real_score: actors`): the actor's
x0 equals the local `guided_x0`, a train step matches the local one, the trainer's driver hook
kills the pool on exit and on failure, and the config key is checked."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.distill import real_score as rs
from pipeline.stages import WorkerContext
from pipeline.stages.self_forcing import SelfForcingStage
from tests.fixtures.distill import PlainEngine, distill_config, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _actors_cfg(teacher: Path, n: int = 2):
    return distill_config(teacher, distill={"real_score": "actors", "actors": n})


def _gone(names: list[str], namespace: str | None, timeout_s: float = 15.0) -> bool:
    """True once none of `names` can be looked up (ray.kill is asynchronous)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for name in names:
            try:
                ray.get_actor(name, namespace=namespace)
                alive.append(name)
            except ValueError:
                pass
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pool(ray_local: None, tiny_teacher_dir: Path):
    """Two real-score actors for the module, through the stage's driver hook."""
    cfg = _actors_cfg(tiny_teacher_dir)
    with SelfForcingStage.driver_resources(cfg) as extra:
        yield cfg, extra
    assert _gone(extra[rs.NAMES_KEY], extra[rs.NAMESPACE_KEY])


def _stage(cfg, extra=None, rank: int = 0) -> tuple[SelfForcingStage, WorkerContext]:
    ctx = WorkerContext(cfg, rank, 2, torch.device("cpu"), torch.float32, dict(extra or {}))
    torch.manual_seed(cfg.train.seed)  # as the trainer does: fresh sinks are seeded
    stage = SelfForcingStage()
    stage.build(ctx, lambda net, lr=None, per_step=1: PlainEngine(net, lr or 1e-3))
    return stage, ctx


def test_actor_x0_equals_local_guided_x0(pool, tiny_teacher_dir: Path) -> None:
    import ray

    from pipeline.distill.roles import load_teacher
    from pipeline.distill.trajectories import guided_x0

    cfg, extra = pool
    g = torch.Generator().manual_seed(3)
    xv, xa = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 26, 16, generator=g)
    sv, sa = torch.rand(2, 4, generator=g), torch.rand(2, 26, generator=g)
    captions, scales = ["a red ball", "a blue ball"], (5.0, 9.0)
    actor = ray.get_actor(extra[rs.NAMES_KEY][1], namespace=extra[rs.NAMESPACE_KEY])
    got_v, got_a = ray.get(
        actor.x0.remote(*(t.numpy() for t in (xv, xa, sv, sa)), captions, scales)
    )
    assert got_v.dtype == np.float32 and got_v.shape == (2, 4, 4, 4, 6)
    bundle = load_teacher(str(tiny_teacher_dir))
    with torch.no_grad():
        text, null = bundle.text_encoder(captions), bundle.text_encoder([""])
        want_v, want_a = guided_x0(bundle.model, xv, xa, sv, sa, text, null, scales)
    np.testing.assert_allclose(got_v, want_v.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_a, want_a.numpy(), rtol=1e-5, atol=1e-5)


def test_train_step_on_actors_matches_local(pool, tiny_teacher_dir: Path) -> None:
    cfg, extra = pool
    remote, ctx = _stage(cfg, extra, rank=3)
    assert remote.real is None
    assert all(p.is_meta for p in remote.teacher.model.parameters())  # no teacher weights kept
    assert remote._remote.name == extra[rs.NAMES_KEY][3 % 2]  # rank % N
    local_cfg = cfg.model_copy(
        update={"distill": cfg.distill.model_copy(update={"real_score": "local"})}
    )
    local, local_ctx = _stage(local_cfg, rank=3)
    batch = make_batch(cfg)
    got = remote.train_step(1, lambda: batch, ctx)
    want = local.train_step(1, lambda: batch, local_ctx)
    for key in ("loss/dmd_video", "loss/dmd_audio", "loss/critic", "grad/out_video"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for (name, p), q in zip(
        remote.engine.module.named_parameters(), local.engine.module.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_driver_hook_releases_the_pool_on_failure(
    ray_local: None, tiny_teacher_dir: Path
) -> None:
    import ray

    from pipeline.trainer import stage_driver

    with stage_driver(distill_config(tiny_teacher_dir), "self-forcing") as extra:
        assert extra == {}  # real_score: local starts nothing
    with pytest.raises(RuntimeError, match="fit failed"):
        with stage_driver(_actors_cfg(tiny_teacher_dir, 1), "self-forcing") as extra:
            names, ns = extra[rs.NAMES_KEY], extra[rs.NAMESPACE_KEY]
            assert len(names) == 1 and ray.get(ray.get_actor(names[0], namespace=ns).ready.remote())
            raise RuntimeError("fit failed")
    assert _gone(names, ns)
    with pytest.raises(ValueError, match="not found"):
        rs.RealScoreClient(extra, 0)


def test_worker_without_the_pool_names_the_key(tiny_teacher_dir: Path) -> None:
    with pytest.raises(ValueError, match="distill.real_score=actors"):
        _stage(_actors_cfg(tiny_teacher_dir))  # no driver hook ran: no actor names


def test_real_score_key_is_checked_and_resume_free(tiny_teacher_dir: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.fingerprint import fingerprint

    with pytest.raises(ConfigError, match=r"distill\.real_score: .*'remote'"):
        distill_config(tiny_teacher_dir, distill={"real_score": "remote"})
    local = distill_config(tiny_teacher_dir)
    assert fingerprint(local) == fingerprint(_actors_cfg(tiny_teacher_dir, 1))


def test_worker_extra_from_loop_cfg_reaches_the_context(
    tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.train

    from pipeline import worker_loop

    class Tc:  # the slice of ray.train's context `_context` reads
        def get_local_rank(self) -> int:
            return 0

        def get_world_rank(self) -> int:
            return 1

        def get_world_size(self) -> int:
            return 2

    monkeypatch.setattr(ray.train, "get_context", lambda: Tc())
    cfg = _actors_cfg(tiny_teacher_dir)
    extra = {rs.NAMES_KEY: ["real-score-x-0"], rs.NAMESPACE_KEY: "ns"}
    ctx = worker_loop._context(cfg, {"config": cfg.to_dict(), "worker_extra": extra})
    assert ctx.extra == extra and ctx.rank == 1
    assert worker_loop._context(cfg).extra == {}


def test_actor_gpus_key_is_checked_and_resume_free(tiny_teacher_dir: Path) -> None:
    from pipeline.config import ConfigError, load_config
    from pipeline.fingerprint import fingerprint, resume_diff

    with pytest.raises(ConfigError, match=r"distill\.actor_gpus: .*-1"):
        distill_config(tiny_teacher_dir, distill={"actor_gpus": -1})
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(configs.glob("*.yaml")):
        cfg = load_config(path)
        before_key = cfg.to_dict()  # a config written before the key existed
        del before_key["distill"]["actor_gpus"]
        moved = load_config(path, ["distill.actor_gpus=0.5"])
        assert fingerprint(cfg) == fingerprint(before_key) == fingerprint(moved), path.name
        assert resume_diff(before_key, moved) == []
    assert load_config(configs / "ltx2.yaml").distill.actor_gpus == 1


def test_actor_placement_cpu_and_gpu() -> None:
    from pipeline.distill.roles import actor_placement

    torch.set_num_threads(2)  # the one_thread fixture restores it
    assert actor_placement(0.0) == (torch.device("cpu"), torch.float32)
    assert torch.get_num_threads() == 1  # CPU actors share the box's cores
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"distill\.actor_gpus=0\.5: .*no CUDA device"):
            actor_placement(0.5)
        return
    torch.set_num_threads(2)
    device, dtype = actor_placement(1.0)
    assert device.type == "cuda" and torch.get_num_threads() == 2  # threads left alone
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


def test_gpu_actor_teacher_loads_straight_to_its_device_and_dtype(
    tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: the meta device stands in for the card. A GPU actor's placement reaches
    # Bundle.from_pretrained, which builds the DiT on meta and reads each tensor onto the
    # device in bf16 (never a full fp32 copy on the host); a CPU actor loads as it always did.
    from model import Bundle
    from pipeline.distill import roles

    seen: list[dict] = []
    real = Bundle.from_pretrained.__func__

    def spy(cls, directory, device=None, verify=True, dtype=None):
        seen.append({"device": device, "dtype": dtype})
        return real(cls, directory, device=device, verify=verify, dtype=dtype)

    monkeypatch.setattr(Bundle, "from_pretrained", classmethod(spy))
    meta, cpu_fp32 = (torch.device("meta"), torch.bfloat16), (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(roles, "actor_placement", lambda gpus: meta if gpus > 0 else cpu_fp32)
    gpu = roles.load_actor_teacher(str(tiny_teacher_dir), 1.0)
    assert seen == [{"device": meta[0], "dtype": torch.bfloat16}]
    params = list(gpu.model.parameters())
    assert {(p.device.type, p.dtype, p.requires_grad) for p in params} == {
        ("meta", torch.bfloat16, False)
    }
    cpu = roles.load_actor_teacher(str(tiny_teacher_dir), 0.0)
    assert seen[1] == {"device": None, "dtype": None}  # the CPU path is unchanged
    assert {p.dtype for p in cpu.model.parameters()} == {torch.float32}
    # The direct read gives exactly the weights of the old load-then-cast path.
    direct = Bundle.from_pretrained(tiny_teacher_dir, device="cpu", dtype=torch.bfloat16)
    cast = Bundle.from_pretrained(tiny_teacher_dir).to("cpu", torch.bfloat16)
    want = cast.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in direct.model.state_dict().items())
    from pipeline.registry import load_bundle  # the models:/ / runs:/ route passes them on too

    reg = load_bundle(str(tiny_teacher_dir), device="cpu", dtype=torch.bfloat16)
    assert seen[-1] == {"device": "cpu", "dtype": torch.bfloat16}
    assert {p.dtype for p in reg.model.parameters()} == {torch.bfloat16}
