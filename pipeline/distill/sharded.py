"""Trained roles under ZeRO-3 without a full copy on any rank: built under `deepspeed.zero.Init`
and filled with this rank's slice of each source tensor.

`build_role(kind, entry, teacher, cfg)` is `roles.build_role` for `train.zero_stage: 3`: the
network is constructed under `zero.Init` (each parameter is partitioned as its module is built,
so a rank holds 1/world of the weights, in the compute dtype, on its device), then
`fill_partitions` copies into each parameter's partition (`p.ds_tensor`, the flat slice
[rank·n, (rank+1)·n) of the flattened tensor, zero padded) the matching elements of the source:
the teacher's state dict (already on this rank's device in the compute dtype), or a Bundle's
(e.g. the `ode` stage's student). No collective and no gather: each rank reads its own elements.
Keys a role may lack (the student's fresh audio sinks) keep the value `zero.Init` gave them,
which it broadcast from rank 0. Engines are made by `pipeline.parallelize.make_engine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from model import AVDiT
from pipeline.config import DistillSection, JobConfig
from pipeline.distill import roles


def is_partitioned(net: torch.nn.Module) -> bool:
    """Whether `net`'s parameters are ZeRO-3 partitions (built under `zero_init`)."""
    return any(hasattr(p, "ds_tensor") for p in net.parameters())


def zero_init(cfg: JobConfig, dtype: torch.dtype) -> Any:
    """The `deepspeed.zero.Init` context for networks of this job (its ZeRO-3 config), whose
    parameters come out in `dtype`, the job's compute dtype.

    The dtype is left to the config, never passed: DeepSpeed 0.19's `Init._set_dtype` reads an
    explicit dtype as `dtype or fp16 if fp16_supported() else bf16 ...` (precedence), so on a
    CPU whose accelerator reports no fp16 every explicit dtype, float32 included, became bf16."""
    import deepspeed

    from pipeline.parallelize import ds_config

    config = ds_config(cfg)
    chosen = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    if chosen != dtype:
        raise ValueError(f"zero_init: the job's DeepSpeed config builds {chosen}, not {dtype}")
    return deepspeed.zero.Init(config_dict_or_path=config)


def build_role(
    kind: roles.RoleKind,
    entry: DistillSection.Role | None,
    teacher: AVDiT,
    cfg: JobConfig,
    dtype: torch.dtype,
) -> AVDiT:
    """A partitioned student or critic (teacher: frozen in place, as `roles.build_role`)."""
    if kind == "teacher":
        return roles.build_role("teacher", None, teacher, cfg)
    assert entry is not None
    with zero_init(cfg, dtype):
        net = AVDiT(roles.role_config(kind, teacher.cfg, cfg))
    where = f"distill.{kind}.init_from"
    if entry.init_from == "teacher":
        fill_partitions(net, teacher.state_dict(), where)
    elif entry.init_from != "random":
        p = next(teacher.parameters())
        source = roles.load_bundle_ref(entry.init_from, where, device=p.device, dtype=dtype)
        fill_partitions(net, source.model.state_dict(), where)
        del source
    net.train()
    return net if entry.trainable else roles._freeze(net)


def fill_partitions(net: AVDiT, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy this rank's elements of each tensor of `state` into `net`'s ZeRO-3 partitions.

    Same key rules as `roles.load_from_teacher`: only the audio sinks may be missing; unexpected
    or mis-shaped keys are an error naming them."""
    allowed = {roles.SINK_KEY} if net.cfg.sinks else set()
    params = dict(net.named_parameters())
    missing = sorted(set(params) - set(state) - allowed)
    unexpected = sorted(set(state) - set(params))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(params[k].ds_shape)}"
        for k in set(params) & set(state)
        if tuple(state[k].shape) != tuple(params[k].ds_shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where}: weights do not fit — missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, shape mismatches {sorted(shapes)[:8]}"
        )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with torch.no_grad():
        for name, p in params.items():
            if name in state:
                copy_partition(p, state[name], rank)


def copy_partition(p: torch.nn.Parameter, full: torch.Tensor, rank: int) -> None:
    """p.ds_tensor ← elements [rank·n, rank·n + n) of `full` flattened (n = partition size)."""
    part = p.ds_tensor
    n = part.numel()
    flat = full.detach().reshape(-1)
    lo, hi = min(rank * n, flat.numel()), min(rank * n + n, flat.numel())
    part.zero_()  # the padding past the tensor's end stays zero, as DeepSpeed pads it
    part.view(-1)[: hi - lo].copy_(flat[lo:hi].to(part.device, part.dtype))
