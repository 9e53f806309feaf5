"""`omniforcing export`: a teacher checkpoint's EMA weights → a model.Bundle, without Ray or
DeepSpeed, optionally with an autoguidance guide (`model.guidance`) and narrower weights on disk.

The guide is an earlier checkpoint of the same run (or any teacher bundle with the same latent
geometry): the shipped demo teacher (step 10000 of its run, fine-tuned to 18609) is guided by
its step 5000, both stored in fp16 to stay under the repository's 25 MB budget
(benchmarks/RESULTS.md, issue 8). It trains nothing and samples nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_bundle(ckpt_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(Bundle, extra) of a teacher checkpoint folder (step-…): its EMA weights, the run's codecs.

    For checkpoints below ZeRO-3 (each rank's EMA holds whole tensors), e.g. a long CPU run that
    is stopped between its periodic checkpoints. Codecs come from the run's `data.codec_dir`.
    """
    from safetensors.torch import load_file

    from pipeline.checkpoint import read_meta
    from pipeline.config import validate
    from pipeline.stages.teacher import teacher_bundle

    d = Path(ckpt_dir)
    meta = read_meta(d)
    cfg = validate(meta["config"], source=str(d / "meta.json"))
    if cfg.train.zero_stage == 3:
        raise ValueError(f"{d}: ZeRO-3 checkpoints hold EMA shards; export by resuming the run")
    ema = d / "ema" / "teacher-rank0.safetensors"
    if not ema.is_file():
        raise FileNotFoundError(f"{d}: no EMA weights at {ema} (train.ema.enabled was false?)")
    extra = {"stage": "teacher", "step": meta["step"], "source": str(d)}
    mcfg = cfg.build_model_config(causal=False)
    return teacher_bundle(cfg, mcfg, load_file(str(ema))), extra


def _any_bundle(ref: str | Path, what: str) -> tuple[Any, dict[str, Any]]:
    """A teacher checkpoint folder (has meta.json) or a saved Bundle folder."""
    from model import Bundle
    from model.bundle import read_config

    d = Path(ref)
    if (d / "meta.json").is_file():
        return checkpoint_bundle(d)
    if (d / "config.json").is_file():
        b = Bundle.from_pretrained(d)  # verifies the checksums: the config is not re-hashed
        extra = read_config(d, verify=False).get("extra", {})
        return b, {"source": str(d)} | {k: extra[k] for k in ("step", "guide") if k in extra}
    raise FileNotFoundError(f"{what}={str(ref)!r}: neither a teacher checkpoint nor a bundle")


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    guide: str | Path | None = None,
    guide_weight: float = 1.0,
    weights_dtype: str = "float32",
    stagger: float | None = None,
) -> Path:
    """Write the teacher of `ckpt_dir` (a checkpoint folder, or a teacher bundle such as a
    `pipeline.single` fine-tune's export) to `out_dir`; with `guide`, that checkpoint's (or
    bundle's) DiT is the weaker model of autoguidance at `guide_weight` (a bundle's own guide is
    kept when `guide` is None); DiT weights stored in `weights_dtype`; `stagger` sets the
    sampler's Δ (`flow.staggered_sigmas`; the bundle's own when None)."""
    from model.guidance import Guide

    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"--weights-dtype {weights_dtype!r}: one of {sorted(WEIGHT_DTYPES)}")
    if guide_weight < 0:
        raise ValueError(f"--guide-weight {guide_weight}: must be >= 0")
    if stagger is not None and stagger < 0:
        raise ValueError(f"--stagger {stagger}: must be >= 0")
    bundle, extra = _any_bundle(ckpt_dir, "--checkpoint")
    if bundle.config.causal:
        raise ValueError(f"--checkpoint {ckpt_dir}: a causal (student) bundle, not a teacher")
    extra = {"stage": "teacher"} | extra
    if guide is not None:
        g, g_extra = _any_bundle(guide, "--guide")
        if _latents(g.config) != _latents(bundle.config):
            raise ValueError(
                f"--guide {guide}: its latents (grid, video channels, audio channels, fps, audio "
                f"latents/s) {_latents(g.config)} differ from the teacher's "
                f"{_latents(bundle.config)}: a guide must denoise the same latents"
            )
        bundle.guide = Guide(g.model, g.text_encoder, float(guide_weight))
        extra["guide"] = {"weight": float(guide_weight)} | {
            k: v for k, v in g_extra.items() if k in ("step", "source")
        }
    if stagger is not None:
        bundle.stagger = float(stagger)
    extra["weights_dtype"] = weights_dtype
    return bundle.save_pretrained(out_dir, extra, WEIGHT_DTYPES[weights_dtype])


def _latents(mcfg: Any) -> tuple:
    """What a guide must share with its teacher: the latent geometry both denoise."""
    return (
        tuple(mcfg.video_latent_hw),
        mcfg.video.latent_channels,
        mcfg.audio.latent_channels,
        mcfg.fps,
        mcfg.audio_latents_per_s,
    )
