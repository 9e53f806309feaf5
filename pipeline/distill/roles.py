"""Roles are data: the teacher, student and critic networks built by one factory from config.

`load_teacher(ref)` opens the teacher Bundle (a local dir, or a `models:/` URI / run id through
`pipeline.registry.load_bundle`; a bare run id means its `bundle` artifact). `build_role(kind,
entry, teacher)` makes one network from a `distill.<role>` entry {init_from, trainable}:
init_from is `teacher`, `random` or a Bundle reference (e.g. the `ode` stage's student for
`self-forcing`). The student is causal with audio sinks (fresh when copied from the teacher: the
sink parameter is the only key it lacks), the critic is bidirectional, the teacher is frozen. It holds no engines (pipeline.parallelize) and no losses (pipeline.distill.dmd).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from model import AVDiT, Bundle
from pipeline.config import DistillSection, JobConfig

RoleKind = Literal["teacher", "student", "critic"]
SINK_KEY = "audio_sinks"


RUN_ID = re.compile(r"[0-9a-f]{32}")
# The embedded default's teacher, trained by `omniforcing train teacher` and shipped as package
# data (checksummed; its training record sits beside it in demo-teacher-record/).
SHIPPED = "shipped"
SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "demo-teacher"


def bundle_uri(ref: str) -> str:
    """A loadable reference: `shipped` is the packaged demo teacher; a bare MLflow run id means
    that run's exported `bundle` artifact; anything else is a folder or a models:/ runs:/ URI."""
    if ref == SHIPPED:
        return str(SHIPPED_TEACHER)
    return f"runs:/{ref}/bundle" if RUN_ID.fullmatch(ref) and not Path(ref).exists() else ref


def load_bundle_ref(
    ref: str,
    what: str,
    dst: str | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Bundle:
    """A Bundle from a local dir, or a `models:/` / `runs:/` URI or run id via the registry.
    `device`/`dtype`: the DiT is read straight onto them (`Bundle.from_pretrained`)."""
    if Path(ref).is_dir() and (Path(ref) / "config.json").is_file():
        return Bundle.from_pretrained(ref, device=device, dtype=dtype)
    try:
        from pipeline.registry import load_bundle
    except ImportError:
        raise ValueError(
            f"{what}={ref!r}: not a local Bundle dir and pipeline.registry is not available"
        ) from None
    return load_bundle(bundle_uri(ref), dst=dst, device=device, dtype=dtype)


def load_teacher(
    ref: str | None, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Bundle:
    """The teacher Bundle from `distill.teacher` (dir, models:/ or runs:/ URI, or run id);
    fp32 on the CPU unless `device`/`dtype` are given."""
    if not ref:
        raise ValueError("distill.teacher is not set: give a teacher Bundle dir or models:/ URI")
    bundle = load_bundle_ref(ref, "distill.teacher", device=device, dtype=dtype)
    if bundle.model.cfg.causal:
        raise ValueError(f"distill.teacher={ref!r}: the teacher must be bidirectional (causal)")
    return bundle


def actor_placement(gpus: float) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a teacher actor given its Ray `num_gpus` (`distill.actor_gpus`).

    > 0: the GPU Ray assigned (CUDA_VISIBLE_DEVICES makes it `cuda`), bf16 where the card has it,
    torch threads left at their default. 0: CPU fp32 with one intra-op thread, since the actors
    share the box's cores with trainers and data tasks. Call it inside the actor.
    """
    if gpus <= 0:
        torch.set_num_threads(1)
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"distill.actor_gpus={gpus}: the teacher actor sees no CUDA device "
            "(CPU-only torch build, or no GPU visible to the actor?)"
        )
    return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def load_actor_teacher(ref: str | None, gpus: float) -> Bundle:
    """The frozen teacher for a Ray actor (trajectory scorer, real score), placed by
    `actor_placement`: DiT in its dtype on its device, text encoder on the device (fp32).
    On a GPU the DiT is read straight onto the card in its dtype: loading it in fp32 on the
    CPU first would take ~76 GB of host memory per actor at ltx2 size."""
    device, dtype = actor_placement(gpus)
    if device.type == "cpu":  # fp32 on the CPU is how a bundle loads anyway
        bundle = load_teacher(ref)
    else:
        bundle = load_teacher(ref, device, dtype)
    _freeze(bundle.model)
    return bundle.to(device, dtype)


def role_config(kind: RoleKind, teacher_cfg: Any, cfg: JobConfig) -> Any:
    """The ModelConfig of a role: the teacher's geometry; the student causal with its sinks."""
    if kind != "student":
        return teacher_cfg.replace(causal=False)
    sinks = cfg.model.num_sinks if cfg.model.num_sinks is not None else teacher_cfg.num_sinks
    return teacher_cfg.replace(causal=True, num_sinks=sinks)


def build_role(
    kind: RoleKind, entry: DistillSection.Role | None, teacher: AVDiT, cfg: JobConfig
) -> AVDiT:
    """One network for `kind` from its config entry (teacher: frozen in place, entry ignored)."""
    if kind == "teacher":
        return _freeze(teacher)
    assert entry is not None
    net = AVDiT(role_config(kind, teacher.cfg, cfg))
    where = f"distill.{kind}.init_from"
    if entry.init_from == "teacher":
        load_from_teacher(net, teacher.state_dict(), where)
    elif entry.init_from != "random":  # e.g. the ODE stage's exported student
        load_from_teacher(net, load_bundle_ref(entry.init_from, where).model.state_dict(), where)
    net.train()
    return net if entry.trainable else _freeze(net)


def load_from_teacher(net: AVDiT, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy weights (teacher's, or a student's); only the audio sink tokens may be missing."""
    allowed = {SINK_KEY} if net.cfg.sinks else set()
    missing, unexpected = net.load_state_dict(state, strict=False)
    bad = sorted(set(missing) - allowed)
    if bad or unexpected:
        raise ValueError(
            f"{where}: teacher weights do not fit — missing {bad[:8]}, unexpected "
            f"{sorted(unexpected)[:8]} (only {sorted(allowed)} may be missing)"
        )


def _freeze(net: AVDiT) -> AVDiT:
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def stream_of(name: str) -> str:
    """'video' | 'audio' | 'shared' for a parameter name (same rule as AVDiT.param_counts)."""
    leaf = name.split(".")
    if any(t.startswith(("v_", "video_io", "a2v")) for t in leaf):
        return "video"
    if any(t.startswith(("a_", "audio_io", "v2a", SINK_KEY)) for t in leaf):
        return "audio"
    return "shared"


def student_bundle(
    student: AVDiT, teacher: Bundle, sigmas: Sequence[float] | None = None
) -> Bundle:
    """The exportable student: its DiT with the teacher's codecs and (frozen) text encoder, and
    the few-step σ list it is distilled for (`distill.student_sigmas`)."""
    own = None if sigmas is None else tuple(float(x) for x in sigmas)
    v, a, text = teacher.video_codec, teacher.audio_codec, teacher.text_encoder
    return Bundle(student.eval(), v, a, text, sigmas=own)


def batch_latents(
    batch: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(video [B,Fv,h,w,C], audio [B,Fa,C], captions, keys) of a trainer batch; non-finite
    latents are an error naming the sample key (distillation has no use for a broken row)."""
    import numpy as np

    video = torch.as_tensor(np.ascontiguousarray(batch["video"]), dtype=torch.float32)
    audio = torch.as_tensor(np.ascontiguousarray(batch["audio"]), dtype=torch.float32)
    keys = [str(k) for k in batch["key"]]
    ok = torch.isfinite(video.flatten(1)).all(1) & torch.isfinite(audio.flatten(1)).all(1)
    if not bool(ok.all()):
        bad = [k for k, good in zip(keys, ok.tolist(), strict=True) if not good]
        raise ValueError(f"batch rows {bad}: video/audio latents are not finite")
    captions = [str(c) for c in batch["caption"]]
    return video.to(device, dtype), audio.to(device, dtype), captions, keys


def export_stage_student(stage: Any, out_dir, ctx: Any) -> None:
    """`export` of the `ode` and `self-forcing` stages: their causal student (EMA weights if
    enabled) as a Bundle `promote` can register, with the σ list it is distilled for."""
    ema = stage.emas().get("student")
    export_student(
        stage.engine.module,
        ema.state() if ema else None,
        stage.teacher,
        out_dir,
        stage.name,
        ctx.cfg.distill.student_sigmas,
    )


def export_student(
    module: AVDiT,
    ema_state: dict[str, torch.Tensor] | None,
    teacher: Bundle,
    out_dir,
    stage: str,
    sigmas: Sequence[float] | None = None,
) -> None:
    """Collective: every rank gathers the student (EMA if given) one tensor at a time, and rank 0
    (`out_dir` set) streams each into the Bundle's model.safetensors as it arrives, so no rank
    holds the whole student (at 19 B a full fp32 copy is 76 GB of host memory). `sigmas`: the
    few-step σ list it was distilled for, recorded so serving samples with it."""
    from model.bundle import sampler_config
    from model.dit_bundle import write_streamed_bundle
    from pipeline.parallelize import gathered_entries, iter_gathered

    with torch.device("meta"):  # the names a bundle stores (no non-persistent buffers)
        names = set(AVDiT(module.cfg).state_dict())
    stream = iter_gathered(module, ema_state, names)
    if out_dir is None:
        for _ in stream:  # join every gather rank 0 makes
            pass
        return
    parts = (teacher.video_codec, teacher.audio_codec, teacher.text_encoder)
    entries = gathered_entries(module, names)
    if {name for name, _, _ in entries} != names:  # what load_state_strict used to check
        for _ in stream:
            pass
        raise ValueError(f"{stage} export: the student's tensors are not its state dict's keys")
    try:
        sampler = sampler_config(0.0, sigmas)
        extra = {"stage": stage}
        write_streamed_bundle(out_dir, module.cfg, entries, stream, parts, extra, sampler)
    except BaseException:
        for _ in stream:  # the other ranks wait in this tensor's all_gather: let them finish
            pass
        raise


@torch.no_grad()
def student_sheet(
    module: AVDiT, teacher: Bundle, sigmas: list[float], seconds: int, g: torch.Generator, out_dir
) -> None:
    """Stream one clip from the student (every rank: forwards may be collective under ZeRO-3);
    rank 0 (`out_dir` set) decodes it with the teacher's codec into `student_sheet.png`."""
    from model import rollout_blocks

    p = next(module.parameters())
    emb, mask = teacher.text_encoder(["a red ball"])
    cache = module.new_cache(emb.to(p.dtype), mask, seconds)
    blocks = list(rollout_blocks(module, cache, seconds, sigmas, g))
    if out_dir is None:
        return
    from pipeline.plots import contact_sheet, sample_clip

    video = torch.cat([xv for _, xv, _ in blocks], 1)[0].float().cpu()  # [Fv, h, w, C]
    audio = torch.cat([xa for _, _, xa in blocks], 1)[0].float().cpu()  # [Fa, C]
    frames = teacher.video_codec.decode(video)  # uint8 [F, H, W, 3]
    wave = teacher.audio_codec.decode(audio)  # float [channels, S]
    contact_sheet(frames[:: max(1, frames.shape[0] // 16)].numpy(), out_dir / "student_sheet.png")
    cfg = module.cfg
    sample_clip(frames.numpy(), wave.numpy(), cfg.fps, cfg.sample_rate, out_dir / "student.mp4")
