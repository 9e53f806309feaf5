"""Apply DeepSpeed ZeRO to a built network, from the typed train/scaling config.

Holds: the DeepSpeed config dict (AdamW via torch_adam, ZeRO stage, bf16 on GPU / fp32 on CPU,
grad accumulation, clipping), the warm-up + cosine/constant LR multiplier, `make_engine`,
`TorchEngine` (the same optimizer without DeepSpeed, for `pipeline.single`), shard-aware EMA,
and gathering a full state dict under any ZeRO stage. It does not define models (model/ does)
and does not run the loop (pipeline.worker_loop does). Parallelism is applied *to* a model here,
never written into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import JobConfig


def use_bf16(cfg: JobConfig) -> bool:
    if cfg.train.precision == "auto":
        return cfg.scaling.use_gpu and torch.cuda.is_available()
    return cfg.train.precision == "bf16"


# ZeRO buffer sizes, set explicitly (they are DeepSpeed 0.19's defaults) so the memory plan
# (pipeline.memory) reads the numbers the engines use. Parameters of at most
# PERSISTENCE_THRESHOLD elements stay whole on every rank under ZeRO-3 (DeepSpeed's rule): that
# covers the few a model reads outside its modules' forward (AVDiT.params_outside_forward).
PERSISTENCE_THRESHOLD = 100_000
REDUCE_BUCKET = 500_000_000  # gradient elements reduced per bucket (ZeRO-2/3)
ZERO3_LIVE = 1_000_000_000  # gathered parameter elements alive at once (ZeRO-3)
ZERO3_PREFETCH = 50_000_000  # parameter elements prefetched ahead (ZeRO-3)
SUB_GROUP = 1_000_000_000  # optimizer sub-group elements; its fp32 gradient is made per group


def zero_section(cfg: JobConfig) -> dict[str, Any]:
    """The `zero_optimization` section: stage, buckets, and ZeRO-Offload of the optimizer."""
    t = cfg.train
    z: dict[str, Any] = {"stage": t.zero_stage, "reduce_bucket_size": REDUCE_BUCKET}
    if t.zero_stage == 3:
        z |= {
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
            "stage3_max_live_parameters": ZERO3_LIVE,
            "stage3_prefetch_bucket_size": ZERO3_PREFETCH,
            "sub_group_size": SUB_GROUP,
        }
    if t.offload_optimizer == "cpu":
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return z


def ds_config(cfg: JobConfig, lr: float | None = None) -> dict[str, Any]:
    """DeepSpeed config for one engine; `lr` overrides train.lr (e.g. a critic's own rate).

    AdamW is torch's (no JIT build) unless the optimizer is offloaded: ZeRO-Offload runs
    DeepSpeed's CPU Adam (JIT-built on first use), the same AdamW update in fp32."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr if lr is not None else t.lr,
                "betas": list(t.optimizer.betas),
                "eps": t.optimizer.eps,
                "weight_decay": t.optimizer.weight_decay,
                # plain torch.optim.AdamW: no JIT-built fused kernel
                "torch_adam": t.offload_optimizer == "none",
            },
        },
        "zero_optimization": zero_section(cfg),
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_multiplier(step: int, cfg: JobConfig) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_engine(
    net: nn.Module, cfg: JobConfig, lr: float | None = None, updates_per_step: int = 1
) -> Any:
    """deepspeed.initialize on `net`; returns the engine (optimizer + LR scheduler inside).
    `updates_per_step`: optimizer steps per training step (the critic's TTUR updates), so its
    warm-up and cosine span the run's `train.steps` training steps, not a fifth of them."""
    import warnings

    import deepspeed

    # DeepSpeed 0.19 gathers with the name torch 2.13 deprecated; one warning per worker per
    # stage that says nothing to whoever runs the job.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )

    def multiplier(step: int) -> float:
        # A plain function, not a callable object: LambdaLR.state_dict() would otherwise save the
        # object's __dict__ (the config) into the checkpoint and a resume would restore the *old*
        # horizon. The schedule is a pure function of the current config and the restored step.
        return lr_multiplier(step // updates_per_step, cfg)

    if hasattr(net, "grad_checkpointing"):  # AVDiT: recompute each layer in backward
        net.grad_checkpointing = cfg.train.gradient_checkpointing
    engine, _, _, _ = deepspeed.initialize(
        model=net,
        model_parameters=[p for p in net.parameters() if p.requires_grad],
        config=ds_config(cfg, lr),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
    )
    if cfg.train.zero_stage == 3:
        gather_persistent(net)
    return engine


def gather_persistent(net: nn.Module) -> None:
    """Under ZeRO-3, all-gather the parameters DeepSpeed keeps whole on every rank.

    DeepSpeed gathers a parameter in its module's forward hook and, for persistent ones, after
    every optimizer step; a model that reads one outside any forward (AVDiT's audio sinks in
    `forward_block`, the output tables in `head`) would see an empty partition before the first
    step. Those must be persistent: refused by name otherwise (collective: call on all ranks)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    named = dict(net.named_parameters())
    outside = [n for n in getattr(net, "params_outside_forward", ()) if n in named]
    partitioned = [n for n in outside if not getattr(named[n], "ds_persist", False)]
    if partitioned:
        raise ValueError(
            f"ZeRO-3: parameters {partitioned} are read outside a module forward but are larger "
            f"than the persistence threshold ({PERSISTENCE_THRESHOLD} elements)"
        )
    todo = [
        p
        for p in named.values()
        if getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE
    ]
    if todo:
        todo[0].all_gather(param_list=todo)


class TorchEngine:
    """The part of DeepSpeed's engine interface the stages use, on plain torch AdamW."""

    plain = True  # stages read gradients off the parameters (no ZeRO partitions)

    def __init__(
        self, net: nn.Module, cfg: JobConfig, lr: float | None = None, updates_per_step: int = 1
    ) -> None:
        """`lr`: this engine's peak rate (the critic's `distill.critic_lr`), else `train.lr`;
        `updates_per_step` as in `make_engine`."""
        t = cfg.train
        self.module, self.cfg, self.accum, self.clip = net, cfg, t.grad_accum, t.clip_grad
        params = [p for p in net.parameters() if p.requires_grad]
        fused = {"fused": True} if params and params[0].is_cuda else {}
        self.optimizer = torch.optim.AdamW(
            params,
            lr=lr if lr is not None else t.lr,
            betas=tuple(t.optimizer.betas),
            eps=t.optimizer.eps,
            weight_decay=t.optimizer.weight_decay,
            **fused,
        )
        # pipeline.single replaces self.cfg once it has measured the step rate (a new horizon),
        # so the multiplier reads self.cfg at every call.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s // updates_per_step, self.cfg)
        )
        self.micro, self.grad_norm = 0, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()  # DeepSpeed scales by 1/grad_accum the same way

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip or math.inf)
        self.grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def get_global_grad_norm(self) -> float:
        return self.grad_norm

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class Ema:
    """Exponential moving average of this rank's parameter pieces, kept in fp32."""

    def __init__(self, net: nn.Module, decay: float, offload: bool = False) -> None:
        """`offload`: the shadow lives in host memory (train.ema.offload), else beside the
        parameter pieces on their device."""
        self.decay = decay
        self.names = [n for n, p in net.named_parameters() if p.requires_grad]
        params = dict(net.named_parameters())
        dev = "cpu" if offload else None
        self.shadow = {n: _local(params[n]).detach().float().to(dev).clone() for n in self.names}

    def decay_at(self, step: int | None) -> float:
        """The decay of the update after optimizer step `step` (0-based): min(decay,
        (1 + step) / (10 + step)), the usual warm-up, so a run of a few hundred steps exports
        what it learned (at 0.999 flat, 40 steps would leave 96 % of the initial weights)."""
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, net: nn.Module, step: int | None = None) -> None:
        params = dict(net.named_parameters())
        w = 1 - self.decay_at(step)
        for n in self.names:
            shadow = self.shadow[n]
            shadow.lerp_(_local(params[n]).detach().to(shadow.device).float(), w)

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        missing = sorted(set(self.names) - set(tensors))
        if missing:
            raise ValueError(f"{where}: EMA lacks {missing[:5]}")
        for n in self.names:
            if tensors[n].shape != self.shadow[n].shape:
                raise ValueError(f"{where}: EMA {n} shape {tuple(tensors[n].shape)} mismatch")
            self.shadow[n].copy_(tensors[n])


def gather_full(
    net: nn.Module, pieces: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Full fp32 tensors of every parameter on every rank (collective: call on all ranks).

    `pieces` (e.g. EMA shards) replaces the live parameter pieces; below ZeRO-3 a piece is the
    whole tensor. Under ZeRO-3 a piece is a flat partition [ceil(numel/world)] that is
    all-gathered, concatenated, cut to numel and reshaped to `ds_shape`. Holds the whole model:
    for a large one, stream it with `gathered_entries` + `iter_gathered` instead.
    """
    return dict(iter_gathered(net, pieces))


def gathered_entries(net: nn.Module, names: set[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(name, float32, full shape) of what `iter_gathered(net, …, names)` yields, in order."""
    out = [
        (n, torch.float32, tuple(getattr(p, "ds_shape", p.shape)))
        for n, p in net.named_parameters()
        if names is None or n in names
    ]
    out += [
        (n, torch.float32, tuple(b.shape))
        for n, b in net.named_buffers()
        if names is None or n in names
    ]
    return out


def iter_gathered(
    net: nn.Module, pieces: dict[str, torch.Tensor] | None = None, names: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """`gather_full` one tensor at a time (collective: every rank must exhaust it in step), so a
    writer holds one full fp32 tensor, never the model (19 B: 76 GB). `names`: only these
    (e.g. the keys of a state dict: non-persistent buffers are not saved)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name, p in net.named_parameters():
        local = _local(p)  # an offloaded EMA piece is gathered from the parameter's device
        piece = (pieces or {}).get(name, local).detach().to(local.device).float()
        if hasattr(p, "ds_tensor"):
            parts = [torch.empty_like(piece) for _ in range(world)]
            dist.all_gather(parts, piece.contiguous())  # every rank, listed or not
            full = torch.cat(parts)[: p.ds_numel].reshape(p.ds_shape).cpu()
        else:
            full = piece.clone().cpu()
        if names is None or name in names:
            yield name, full
    for name, b in net.named_buffers():
        if names is None or name in names:
            yield name, b.detach().float().cpu()


def save_engine(engine: Any, d: Path, name: str) -> None:
    """Every rank writes its own shards (DeepSpeed hangs if one rank skips this)."""
    engine.save_checkpoint(str(d / "engines" / name), tag="state")


def load_engine(engine: Any, d: Path, name: str) -> None:
    path = d / "engines" / name
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {d}: no engine state for {name!r}")
    loaded, _ = engine.load_checkpoint(str(path), tag="state")
    if loaded is None:
        raise RuntimeError(f"checkpoint {d}: DeepSpeed could not load engine {name!r}")
