"""One rank of tests/test_zero3.py (run as `python tests/zero3_worker.py PORT RANK WORLD TEACHER
OUT`): a real DeepSpeed ZeRO-3 self-forcing stage on CPU (gloo), built partitioned, next to the
same stage built whole on one rank; writes what the test compares as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

port, rank, world, teacher, out = sys.argv[1:6]
os.environ.update(
    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank,
    DS_ACCELERATOR="cpu",
)  # fmt: skip
torch.set_num_threads(1)

import deepspeed  # noqa: E402

from model.bundle import Bundle  # noqa: E402
from pipeline.parallelize import gather_full  # noqa: E402
from pipeline.stages import WorkerContext  # noqa: E402
from pipeline.stages.self_forcing import SelfForcingStage  # noqa: E402
from tests.fixtures.distill import distill_config, make_batch  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
train = {"seed": 0, "precision": "fp32", "zero_stage": 3, "gradient_checkpointing": True,
         "ema": {"enabled": True, "decay": 0.9}}  # fmt: skip
cfg = distill_config(teacher, train=train, data={"batch_size": 1})
ctx = WorkerContext(cfg, int(rank), int(world), torch.device("cpu"), torch.float32)
stage = SelfForcingStage()
stage.setup(ctx)
student = stage.engine.module
report: dict = {"ckpt": bool(student.grad_checkpointing)}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


full = gather_full(student)
teacher_state = stage.teacher.model.state_dict()
report["equal_teacher"] = all(torch.equal(full[k], teacher_state[k].float()) for k in teacher_state)
report["sinks"] = full["audio_sinks"].flatten()[:4].tolist()
batch = make_batch(cfg, n=1)
report["measured_before"] = {  # this rank's engine state, as DeepSpeed allocated it
    "weights": nbytes(p.ds_tensor for p in student.parameters())
    + nbytes(p.data for p in student.parameters() if p.ds_persist),
    "gradients": nbytes([stage.engine.optimizer.grad_partitions_flat_buffer]),
    "master": nbytes(stage.engine.optimizer.fp32_partitioned_groups_flat),
    "ema": nbytes(stage.emas()["student"].shadow.values()),
}
out_step = stage.train_step(0, lambda: batch, ctx)
report["losses"] = {k: out_step[k] for k in ("loss/dmd_video", "loss/dmd_audio", "loss/critic")}
opt = stage.engine.optimizer
report["moments"] = nbytes(  # Adam's exp_avg and exp_avg_sq, allocated at the first step
    v for st in opt.optimizer.state.values() for v in st.values() if v.dim() > 0
)
after = gather_full(student)
report["moved"] = float(max((after[k] - full[k]).abs().max() for k in full))
# The export streams one gathered tensor at a time into rank 0's Bundle: the EMA weights, whole.
ema_full = gather_full(student, stage.emas()["student"].state())
stage.export(Path(out + ".bundle") if int(rank) == 0 else None, ctx)
if int(rank) == 0:
    loaded = Bundle.from_pretrained(out + ".bundle")
    report["export_sigmas"] = list(loaded.sigmas or ())
    exported = loaded.model.state_dict()
    params = {n for n, _ in student.named_parameters()}
    report["export_is_ema"] = params <= set(exported) <= set(full) and all(
        torch.equal(exported[k].float(), ema_full[k]) for k in exported
    )
    report["ema_differs"] = any(not torch.equal(ema_full[k], after[k]) for k in exported)
if int(rank) == 0:
    with open(out, "w") as f:
        json.dump(report, f)
