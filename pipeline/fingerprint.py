"""Which parts of a job config a checkpoint is bound to: the resume view, its sha256 fingerprint
(stored with every checkpoint and MLflow run) and the key-by-key difference shown when a resume is
refused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import JobConfig

# Keys that may change between an interrupted run and its resume without changing its maths.
_RESUME_FREE = (
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.reliance_every",
    "train.plot_every",
    "train.fidelity",  # what is measured and logged, never what is trained
    "scaling.max_failures",
    "scaling.cpus_per_worker",
    # Where the DMD real score runs (same teacher, same CFG). Free also so that adding the key
    # left the fingerprints of configs written before it unchanged.
    "distill.real_score",
    # Where the teacher actors compute (same teacher, same CFG): > 0 runs the teacher DiT in bf16,
    # but the ODE state, CFG and x0 stay fp32 either way, so only the network's own rounding
    # differs. Free also so that adding the key left existing fingerprints unchanged.
    "distill.actor_gpus",
    "data.actor_start_timeout_s",  # how long to wait for actors, not what they compute
    # `auto` picks the codecs from distill.teacher (fingerprinted) and codec_dir's contents were
    # never fingerprinted either. Free also so that adding the key left fingerprints unchanged.
    "data.codecs",
    # Memory, not maths: recomputed activations are the same numbers; the offloaded AdamW is the
    # same fp32 update on the CPU; the GPU size only feeds `omniforcing check`.
    "train.gradient_checkpointing",
    "train.offload_optimizer",
    "train.ema.offload",
    "scaling.gpu_memory_gb",
    "storage",
    "mlflow",
)


def resume_view(cfg: JobConfig | dict[str, Any]) -> dict[str, Any]:
    """The flattened parts of a config that must match for a checkpoint to be resumable."""
    flat = flatten(cfg.to_dict() if isinstance(cfg, JobConfig) else cfg)
    return {
        k: v
        for k, v in flat.items()
        if not any(k == free or k.startswith(free + ".") for free in _RESUME_FREE)
    }


def fingerprint(cfg: JobConfig | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `resume_view(cfg)`."""
    blob = json.dumps(resume_view(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_diff(old: JobConfig | dict[str, Any], new: JobConfig | dict[str, Any]) -> list[str]:
    """Dotted key paths whose resume-relevant values differ, as `key: old -> new`."""
    a, b = resume_view(old), resume_view(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dicts stay leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
