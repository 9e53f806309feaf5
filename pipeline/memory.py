"""The memory plan of a distillation job: bytes per trainer rank and per teacher actor, by term.

Follows what the code does (pipeline.parallelize, pipeline.distill.sharded, the stages):
- each trained network (student; the critic in `self-forcing`) is one DeepSpeed engine. Its
  weights are in the compute dtype (bf16 on GPU), partitioned over `scaling.num_workers` ranks
  under ZeRO-3 (ceil(n / world) elements per parameter, plus whole copies of the parameters
  below the persistence threshold, plus up to `stage3_max_live_parameters` gathered at a time),
  whole below it. Gradients: this rank's partition in the compute dtype (whole under ZeRO-1), one
  reduce bucket, and the fp32 gradient of one optimizer sub-group at the step. Optimizer: fp32
  master weights + Adam's two moments (12 bytes per partition element), on the GPU or, with
  `train.offload_optimizer: cpu`, in host memory with the fp32 gradients.
- the student's EMA (`train.ema.enabled`): fp32 of this rank's pieces (pipeline.parallelize.Ema).
- the frozen teacher: whole in the compute dtype on every trainer (`local`), or on actors
  (`distill.real_score: actors` for self-forcing, `teacher_mode: actors` for ode) in bf16 on
  their `distill.actor_gpus` (a fraction: several actors share one card).
- activations: measured by running the step's code on the meta device (pipeline.memory_probe):
  the Self-Forcing rollout (gradient at the exit step, its KV cache) of `data.seconds` seconds at
  `data.batch_size`, the critic's full-sequence forward; with `train.gradient_checkpointing`.
- the teacher's text encoder, on every trainer and actor (LTX-2: Gemma 3 12B, ~24 GB in bf16).
Not counted: the CUDA context and allocator fragmentation (`RESERVE` is left for them), the data
pipeline's codec actors, and a teacher's autoguidance network (not in these presets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline import memory_probe as probe
from pipeline import parallelize as par
from pipeline.config import JobConfig

GB = 1e9
RESERVE = 4 * GB  # CUDA context, NCCL buffers, allocator fragmentation: left free on every GPU
TERMS = ("weights", "gathered", "gradients", "optimizer", "ema", "teacher", "text", "activations")
# LTX-2's text encoder: Gemma 3 12B's language model (~11.8 B parameters; the vision tower is not
# kept) + the connectors, in the bundle's dtype (bf16): an estimate used when the teacher bundle
# cannot be read here (s3://, models:/); a local bundle is measured (its text.safetensors).
LTX2_TEXT_BYTES = int(24e9)


@dataclass
class Row:
    """One process's bytes by term on its GPU, and in host memory."""

    who: str
    count: int  # how many such processes
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.gpu.values())

    def largest(self) -> str:
        return max(self.gpu, key=lambda k: self.gpu[k])


@dataclass
class Plan:
    stage: str
    rows: list[Row]
    gpu_bytes: int  # one GPU's memory (scaling.gpu_memory_gb)
    notes: list[str]

    def problems(self) -> list[str]:
        """Rows over a GPU's memory less RESERVE, each naming its largest term."""
        out = []
        for r in self.rows:
            if r.total + RESERVE > self.gpu_bytes:
                big = r.largest()
                out.append(
                    f"{self.stage}: {r.who} needs {r.total / GB:.1f} GB + {RESERVE / GB:.0f} GB "
                    f"reserve > {self.gpu_bytes / GB:.0f} GB; largest term: {big} "
                    f"{r.gpu[big] / GB:.1f} GB"
                )
        return out


def compute_dtype(cfg: JobConfig) -> torch.dtype:
    p = cfg.train.precision
    return torch.bfloat16 if p == "bf16" or (p == "auto" and cfg.scaling.use_gpu) else torch.float32


def numels(mcfg) -> list[int]:
    """Element count of every parameter of the network (built on the meta device)."""
    return [p.numel() for p in probe.build(mcfg, "meta", torch.float32).parameters()]


def engine_bytes(sizes: list[int], cfg: JobConfig, ema: bool) -> Row:
    """One rank's bytes for one DeepSpeed engine over parameters of `sizes` elements."""
    w, stage = cfg.scaling.num_workers, cfg.train.zero_stage
    b = torch.finfo(compute_dtype(cfg)).bits // 8
    total = sum(sizes)
    part = sum(math.ceil(n / w) for n in sizes) if stage == 3 else math.ceil(total / w)
    row = Row("", 1)
    if stage == 3:
        persistent = sum(n for n in sizes if n <= par.PERSISTENCE_THRESHOLD)
        row.gpu["weights"] = (part + persistent) * b
        row.gpu["gathered"] = min(par.ZERO3_LIVE, total) * b
    else:
        row.gpu["weights"] = total * b
    grads = (total if stage == 1 else part) * b + min(par.REDUCE_BUCKET, total) * b
    sub = min(par.SUB_GROUP, part) * 4 if stage == 3 else part * 4
    offload = cfg.train.offload_optimizer == "cpu"
    side = row.host if offload else row.gpu
    row.gpu["gradients"] = grads + (0 if offload else sub)
    side["optimizer"] = 12 * part
    if offload:
        row.host["gradients"] = 4 * part
    if ema:  # fp32 of this rank's pieces, on the GPU or in host memory (train.ema.offload)
        where = row.host if cfg.train.ema.offload else row.gpu
        where["ema"] = 4 * (part if stage == 3 else total)
    return row


def text_encoder_bytes(cfg: JobConfig) -> int:
    """Bytes of the teacher's text encoder, which every trainer and teacher actor holds on its
    device: a local teacher bundle's text.safetensors, else the LTX-2 estimate (arch ltx2) or 0
    (our word encoder: a few MB)."""
    from pathlib import Path

    ref = cfg.distill.teacher
    if ref and (Path(ref) / "text.safetensors").is_file():
        return (Path(ref) / "text.safetensors").stat().st_size
    return LTX2_TEXT_BYTES if cfg.build_model_config(False).arch == "ltx2" else 0


def text_tokens(mcfg) -> int:
    """Prompt length the plan assumes: LTX-2 pads Gemma prompts to 1024 tokens; ours to 32."""
    return 1024 if mcfg.arch == "ltx2" else 32


_CACHE: dict[str, probe.Activations] = {}


def _probe(mcfg, dtype: torch.dtype, kind: str, args: tuple, slope: bool = True):
    """A probe of pipeline.memory_probe, memoised per process (the `ode` and `self-forcing`
    plans share some, and each takes seconds to tens of seconds at LTX-2 size)."""
    key = repr((mcfg.to_dict(), dtype, kind, args, slope))
    if key not in _CACHE:
        fn = probe.probe_rollout if kind == "rollout" else probe.probe_forward
        _CACHE[key] = probe.by_layers(
            mcfg, dtype, lambda n, layer: fn(n, *args, layer=layer), slope
        )
    return _CACHE[key]


def activations(cfg: JobConfig, stage: str) -> tuple[int, int]:
    """(trainer activation bytes, the inference transient of one frozen forward) per rank."""
    d, dt = cfg.distill, compute_dtype(cfg)
    b, s, ck = cfg.data.batch_size, cfg.data.seconds, cfg.train.gradient_checkpointing
    student, bidir = cfg.build_model_config(True), cfg.build_model_config(False)
    tok = text_tokens(bidir)
    # A no-grad forward holds about one layer's tensors at a time: the largest layer's saved
    # tensors with gradient bound it (CFG: conditional and unconditional rows together).
    infer = _probe(bidir, dt, "forward", (2 * b, s, tok, False), slope=False).layer
    if stage == "ode":
        return _probe(student, dt, "forward", (b, s, tok, ck)).peak, infer
    fwd = _probe(bidir, dt, "forward", (b, s, tok, ck))
    sig = tuple(float(x) for x in d.student_sigmas)
    gen = _probe(student, dt, "rollout", (b, s, sig, tok, ck))
    # The generator's graph stays alive through the real (local) and fake score forwards.
    return max(gen.peak + infer, fwd.peak), infer


def plan(cfg: JobConfig, stage: str = "self-forcing") -> Plan:
    """Bytes per trainer rank and per teacher actor for `stage` ('ode' or 'self-forcing')."""
    d, sc = cfg.distill, cfg.scaling
    b = torch.finfo(compute_dtype(cfg)).bits // 8
    student, critic = numels(cfg.build_model_config(True)), numels(cfg.build_model_config(False))
    actors = (d.real_score if stage == "self-forcing" else d.teacher_mode) == "actors"
    trainer = engine_bytes(student, cfg, cfg.train.ema.enabled)
    if stage == "self-forcing":
        c = engine_bytes(critic, cfg, ema=False)
        for side in ("gpu", "host"):
            mine, theirs = getattr(trainer, side), getattr(c, side)
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + (v if k != "gathered" else 0)  # one gather at a time
    acts, infer = activations(cfg, stage)
    trainer.gpu["teacher"] = 0 if actors else sum(critic) * b
    trainer.gpu["text"] = text_encoder_bytes(cfg)  # captions are encoded on the trainer
    trainer.gpu["activations"] = acts
    trainer.who, trainer.count = "trainer rank", sc.num_workers
    rows = [trainer]
    notes = [
        f"{sc.num_workers} ranks, ZeRO-{cfg.train.zero_stage}, {compute_dtype(cfg)}, "
        f"offload_optimizer={cfg.train.offload_optimizer}, gradient_checkpointing="
        f"{cfg.train.gradient_checkpointing}, batch {cfg.data.batch_size} x {cfg.data.seconds} s, "
        f"{text_tokens(cfg.build_model_config(False))} text tokens"
    ]
    if actors and d.actor_gpus > 0:
        share = max(1, math.floor(1 / d.actor_gpus + 1e-9)) if d.actor_gpus < 1 else 1
        actor = Row("teacher actor GPU", math.ceil(d.actors / share))
        notes.append(f"teacher actors: {d.actors} x {d.actor_gpus:g} GPU, {share} per GPU, bf16")
        actor.gpu["teacher"] = share * sum(critic) * 2  # bf16 on its GPU (roles.actor_placement)
        actor.gpu["text"] = share * text_encoder_bytes(cfg)
        actor.gpu["activations"] = share * infer * 2 // b  # its bf16 forward of 2 x batch (CFG)
        rows.append(actor)
    elif actors:
        notes.append("teacher actors on CPU (distill.actor_gpus 0): no GPU rows")
    return Plan(stage, rows, int(sc.gpu_memory_gb * GB), notes)


def table(p: Plan) -> list[str]:
    """The plan as text lines: one row per process kind, GB per term, GPU total and host."""
    head = f"{'':34}" + "".join(f"{t:>12}" for t in TERMS) + f"{'GPU total':>11}{'host':>9}"
    lines = [f"memory plan, stage {p.stage} (GB = 1e9 bytes):", head]
    for r in p.rows:
        cells = "".join(f"{r.gpu.get(t, 0) / GB:12.2f}" for t in TERMS)
        host = sum(r.host.values()) / GB
        lines.append(f"{r.who + f' x{r.count}':34}{cells}{r.total / GB:11.2f}{host:9.2f}")
    lines.append(
        f"  per GPU: {p.gpu_bytes / GB:.0f} GB, {RESERVE / GB:.0f} GB reserved; " + p.notes[0]
    )
    lines += [f"  {n}" for n in p.notes[1:]]
    return lines
