"""pipeline.single: one-process teacher training (the lent-GPU path) on real parts.

TorchEngine must step exactly like the DeepSpeed engine it stands in for (checked against a real
one in a subprocess, so this process keeps no process group); a short run renders world clips,
trains, writes sharded weights with its record, and exports a Bundle that loads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from model.bundle import Bundle
from pipeline import single, single_distill, single_record, tracking
from pipeline.checkpoint import resolve_storage
from pipeline.config import load_config
from pipeline.registry import load_bundle
from pipeline.trainer import _open_run

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINES = r"""
import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from pipeline.config import load_config
from pipeline.registry import load_bundle
from pipeline.trainer import _open_run
from pipeline.parallelize import make_engine
from pipeline.parallelize import TorchEngine

cfg = load_config(None, ["train.lr=0.05", "train.warmup_steps=2", "train.steps=6",
                         "train.grad_accum=2", "train.clip_grad=0.5", "train.zero_stage=1",
                         "train.precision=fp32", "data.batch_size=4",
                         "train.optimizer.weight_decay=0.1"])
out = {}
for name, make in (("torch", TorchEngine), ("deepspeed", make_engine)):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    engine = make(net, cfg)
    g = torch.Generator().manual_seed(1)
    lrs, norms = [], []
    for _ in range(5 * cfg.train.grad_accum):  # 5 optimizer steps of 2 micro-batches
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        engine.backward((engine(x) - y).pow(2).mean())
        engine.step()
        lrs.append(engine.get_lr()[0])
        norms.append(float(engine.get_global_grad_norm() or 0.0))
    out[name] = {"params": [p.detach().flatten().tolist() for p in net.parameters()],
                 "lr": lrs, "norm": norms[1::2]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_torch_engine_steps_like_deepspeed() -> None:
    """Same AdamW, LR schedule, clipping and grad-accumulation scaling as a real DeepSpeed engine
    (ZeRO-1 on one rank, fp32, torch_adam): parameters after 5 optimizer steps agree to float precision."""
    proc = subprocess.run(
        [sys.executable, "-c", ENGINES, str(_free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ds = out["torch"], out["deepspeed"]
    assert ours["lr"] == pytest.approx(ds["lr"], rel=1e-9)
    assert max(ours["norm"]) > 0.5  # clipping at 0.5 was in play
    assert ours["norm"] == pytest.approx(ds["norm"], rel=1e-4)
    for a, b in zip(ours["params"], ds["params"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6), (a[:4], b[:4])


def test_sharded_weights_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"w{i}": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    monkeypatch.setattr(single_record, "SHARD_BYTES", 40_000)  # two tensors per file
    paths = single_record.save_weights(state, {"steps": 7}, tmp_path / "teacher")
    assert [p.name for p in paths] == [f"teacher.{k}.safetensors" for k in range(3)]
    loaded, record = single_record.load_weights(tmp_path / "teacher")
    assert record == {"steps": 7}
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # The record rides in every file's header and counts against its budget.
    paths = single_record.save_weights(state, {"note": "x" * 20_000}, tmp_path / "long")
    assert len(paths) == 5  # one 16 KiB tensor per file beside a 20 kB record
    with pytest.raises(FileNotFoundError, match="not a `pipeline.single` train or distill output"):
        single_record.load_weights(tmp_path / "other")
    later = tmp_path / "later"
    later.mkdir()
    single_record.save_weights(state, {"steps": 8}, later / "teacher")
    (later / "teacher.1.safetensors").replace(tmp_path / "teacher.1.safetensors")
    with pytest.raises(ValueError, match="teacher.1.safetensors: from another save"):
        single_record.load_weights(tmp_path / "teacher")  # a save interrupted between its files


def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    """Bad input ends in one line naming it (config key path, missing files), no traceback."""
    cfg = str(ROOT / "configs" / "demo-teacher.yaml")
    base = ["train", "--config", cfg, "--latents", str(tmp_path), "--minutes", "1"]
    cases = [
        (base + ["--out", str(tmp_path / "o"), "--set", "train.bogus=1"], "train.bogus"),
        (base + ["--out", str(tmp_path / "o")], "no video.npy, audio.npy, captions.json"),
        (["export", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "b")], "no w.0"),
        (
            ["export-student", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "b")],
            "no w.0",
        ),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as err:
            single.main(argv)
        assert str(err.value).startswith("error: ") and needle in str(err.value), err.value


def test_batch_larger_than_the_data_is_named(tmp_path: Path) -> None:
    single.render(2, seed=0, codecs=single.SHIPPED, out=tmp_path)
    with pytest.raises(ValueError, match="data.batch_size=4 exceeds the 2 clips"):
        single.RandomBatches(tmp_path, 4, seed=0)


def test_several_renders_are_pooled(tmp_path: Path) -> None:
    """`train --latents A --latents B` draws from both; renders of another clip shape are named."""
    a, b = tmp_path / "a", tmp_path / "b"
    single.render(2, seed=0, codecs=single.SHIPPED, out=a)
    single.render(3, seed=5, codecs=single.SHIPPED, out=b)
    pool = single.RandomBatches([a, b], 5, seed=0)
    videos = np.concatenate([np.load(a / "video.npy"), np.load(b / "video.npy")])
    caps = json.loads((a / "captions.json").read_text()) + json.loads(
        (b / "captions.json").read_text()
    )
    batch = pool()  # one epoch of 5 clips: every clip of both renders once, caption with video
    found = [
        next(i for i, v in enumerate(videos) if np.array_equal(v, row)) for row in batch["video"]
    ]
    assert sorted(found) == [0, 1, 2, 3, 4]
    assert [caps[i] for i in found] == batch["caption"].tolist()
    np.save(b / "audio.npy", np.load(b / "audio.npy")[:, :-1])  # a shorter clip
    with pytest.raises(ValueError, match=f"latents {b}: clips of shape"):
        single.RandomBatches([a, b], 2, seed=0)


@pytest.mark.slow
def test_render_train_export_log(tmp_path: Path, mlflow_uri: str) -> None:
    """World clips → latents → three steps from the shipped teacher → a Bundle that loads, with
    the run's record; starting from the shipped weights, the first loss is already low. `log`
    then makes it a finished MLflow teacher run whose `bundle` artifact loads by run URI."""
    lat = tmp_path / "latents"
    single.render(6, seed=3, codecs=single.SHIPPED, out=lat)
    assert json.loads((lat / "captions.json").read_text())[0].startswith("a ")
    cfg = load_config(
        ROOT / "configs" / "demo-teacher.yaml",
        ["data.batch_size=2", "train.steps=3", "train.reliance_every=2", "train.log_every=1"],
    )
    prefix = single.train(cfg, lat, 5.0, tmp_path / "run", "cpu", init=single.SHIPPED)
    state, record = single_record.load_weights(prefix)
    assert record["steps"] == 3 and record["init"] == single.SHIPPED
    assert [m["step"] for m in record["metrics"]] == [1, 2, 3]
    assert record["metrics"][0]["loss"] < 1.0  # a fresh net starts near 4 (see the GPU logs)
    assert "reliance/audio_on_video" in record["metrics"][2]  # train_step(2): 2 % 2 == 0

    bundle = Bundle.from_pretrained(
        single_record.export(prefix, single.SHIPPED, tmp_path / "bundle")
    )
    assert bundle.config.layers == cfg.build_model_config(causal=False).layers
    extra = json.loads((tmp_path / "bundle" / "config.json").read_text())["extra"]
    shipped_step = json.loads((Path(single.SHIPPED) / "config.json").read_text())["extra"]["step"]
    assert extra["init_step"] == shipped_step and extra["step"] == shipped_step + 3
    ema = {k[len("dit.") :]: v for k, v in state.items() if k.startswith("dit.")}
    exported = load_file(tmp_path / "bundle" / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    shipped = load_file(Path(single.SHIPPED) / "model.safetensors")
    assert any(not torch.equal(exported[k], shipped[k]) for k in exported)  # it trained

    run_id = single_record.log_run(prefix)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags[tracking.STATUS_TAG] == "finished"
    assert run.data.tags[tracking.STAGE_TAG] == "teacher"
    assert run.data.params["data.batch_size"] == "2"
    hist = MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    logged = load_bundle(f"runs:/{run_id}/bundle", dst=str(tmp_path / "dl"))
    for k, v in logged.model.state_dict().items():
        assert torch.equal(v, exported[k])
    storage = resolve_storage(cfg.storage.path)
    with pytest.raises(ValueError, match="recorded by `pipeline.single log`"):
        _open_run(MlflowClient(mlflow_uri), cfg, storage, "teacher", run_id, None)  # no ckpt


@pytest.mark.slow
def test_distill_is_seeded_and_exports_a_causal_student(tmp_path: Path) -> None:
    """`distill` (the self-forcing stage on TorchEngines, one process) from the shipped teacher:
    two runs of one seed write the same student, a third seed another (and with `every` 1 a
    snapshot each step); each snapshot holds the run's record, and `export-student` makes a
    causal Bundle of exactly those weights that differs from where the student started."""
    lat = tmp_path / "latents"
    single.render(3, seed=3, codecs=single.SHIPPED, out=lat)
    sets = ["data.batch_size=1", "distill.critic_updates_per_generator=1", "train.steps=2"]
    sets += ["train.warmup_steps=1"]
    runs = {}
    for name, seed, every in (("a", 0, 0), ("b", 0, 0), ("c", 1, 1)):
        cfg = load_config(ROOT / "configs" / "demo.yaml", [*sets, f"train.seed={seed}"])
        saved = single_distill.distill(cfg, lat, 5.0, tmp_path / name, "cpu", 1, every)
        # `every` 1: a snapshot per step (a curve by step); else the one at the end.
        want = ["student-step-000001", "student-step-000002"] if every else ["student-step-000002"]
        assert [p.name for p in saved] == want
        runs[name] = single_record.load_weights(saved[-1])
    (a, record), (b, _), (c, _) = runs["a"], runs["b"], runs["c"]
    assert record["steps"] == 2 and [m["step"] for m in record["metrics"]] == [1, 2]
    assert {"loss/dmd_video", "loss/critic"} <= set(record["metrics"][0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    out = single_distill.export_student(tmp_path / "a" / "student-step-000002", tmp_path / "s")
    student = Bundle.from_pretrained(out)
    assert student.model.cfg.causal and student.sigmas == (1.0, 0.7507, 0.5448)
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], a[k]) for k in exported)
    shipped = load_file(Path(single.SHIPPED) / "model.safetensors")
    assert any(not torch.equal(exported[k], shipped[k]) for k in shipped)  # it trained
