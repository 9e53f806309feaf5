"""The memory plan (pipeline.memory) against what the code allocates, on CPU.

- activations: the meta-device probe counts, byte for byte, what autograd saves on real CPU
  tensors (rollout with its KV cache and full forwards; with and without activation
  checkpointing), and its 1-/2-layer extrapolation equals a direct count of a deeper network;
- checkpointing changes memory, not numbers: identical gradients through a rollout;
- weights, gradient partition, fp32 master, Adam moments and EMA of a real 2-rank ZeRO-3
  DeepSpeed engine (tests/zero3_worker.py) equal the plan's terms within 2 % (DeepSpeed aligns
  flat buffers), and that engine was built partitioned and filled from the teacher;
- `omniforcing check` prints the table and refuses a plan that does not fit, naming the term.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import preset
from pipeline import memory
from pipeline import memory_probe as mp
from pipeline.config import load_config
from pipeline.distill.rollout import rollout

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = [1.0, 0.7, 0.5]


@pytest.mark.parametrize("ckpt", [False, True])
def test_meta_probe_counts_what_cpu_autograd_saves(ckpt: bool, one_thread) -> None:
    for causal in (True, False):
        got = {}
        for dev in ("cpu", "meta"):
            torch.manual_seed(0)
            net = mp.build(preset("tiny", causal=causal), dev, torch.float32)
            fwd = mp.probe_forward(net, 2, 3, 7, ckpt)
            roll = mp.probe_rollout(net, 2, 3, SIGMAS, 7, ckpt) if causal else None
            got[dev] = (fwd, roll)
        assert got["meta"] == got["cpu"]
        assert got["cpu"][0].saved > 0 and (not ckpt or got["cpu"][0].recompute > 0)


def test_layer_extrapolation_equals_a_direct_count(one_thread) -> None:
    deep = preset("tiny", causal=True, layers=4)
    direct = mp.probe_rollout(mp.build(deep, "cpu", torch.float32), 1, 2, SIGMAS, 5, True)
    scaled = mp.by_layers(
        deep, torch.float32, lambda n, layer: mp.probe_rollout(n, 1, 2, SIGMAS, 5, True, layer)
    )
    assert scaled == direct


def test_checkpointing_keeps_gradients_and_saves_memory(one_thread) -> None:
    torch.manual_seed(0)
    net = mp.build(preset("tiny", causal=True), "cpu", torch.float32)
    text = (torch.randn(2, 5, net.cfg.text_dim), torch.ones(2, 5, dtype=torch.bool))
    grads = []
    for ckpt in (False, True):
        net.grad_checkpointing = ckpt
        net.zero_grad()
        xv, xa = rollout(net, text, 3, SIGMAS, torch.Generator().manual_seed(0), 1)
        (xv.pow(2).mean() + xa.pow(2).mean()).backward()
        grads.append([p.grad for p in net.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)) and grads[0]
    off, on = (mp.probe_rollout(net, 2, 3, SIGMAS, 5, c) for c in (False, True))
    assert on.saved < off.saved / 3


def test_plan_refuses_what_does_not_fit_and_names_the_term() -> None:
    cfg = load_config(None, ["data.source=random", "scaling.gpu_memory_gb=0.005"])
    plan = memory.plan(cfg, "self-forcing")
    problems = plan.problems()
    assert problems and "largest term" in problems[0]
    big = plan.rows[0].largest()
    assert f"largest term: {big}" in problems[0]
    lines = memory.table(plan)
    assert "weights" in lines[1] and "activations" in lines[1] and "trainer rank x1" in lines[2]


@pytest.mark.slow
def test_zero3_engine_bytes_match_the_plan(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "rank0.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.zero3_worker",
                port,
                str(r),
                "2",
                str(tiny_teacher_dir),
                str(out),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
        )  # fmt: skip
        for r in range(2)
    ]
    logs = [p.communicate(timeout=1500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    rep = json.loads(out.read_text())
    assert rep["ckpt"] and rep["equal_teacher"] and rep["moved"] > 0
    assert rep["export_is_ema"] and rep["ema_differs"]  # streamed ZeRO-3 export, tensor by tensor
    assert rep["export_sigmas"] == [1.0, 0.7507, 0.5448]  # distill.student_sigmas, recorded
    assert all(v == v for v in rep["losses"].values())
    from tests.fixtures.distill import distill_config

    cfg = distill_config(
        tiny_teacher_dir,
        train={"zero_stage": 3, "precision": "fp32", "ema": {"enabled": True, "decay": 0.9}},
        scaling={"num_workers": 2},
    )
    plan = memory.engine_bytes(memory.numels(cfg.build_model_config(True)), cfg, ema=True)
    part = plan.gpu["optimizer"] // 12  # partition elements of this rank
    got = rep["measured_before"]
    assert got["weights"] == pytest.approx(plan.gpu["weights"], rel=0.02)
    assert got["ema"] == pytest.approx(plan.gpu["ema"], rel=0.02)
    assert got["gradients"] == pytest.approx(4 * part, rel=0.02)  # fp32 engine: 4 bytes
    assert got["master"] + rep["moments"] == pytest.approx(plan.gpu["optimizer"], rel=0.02)
