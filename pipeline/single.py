"""Teacher training in one process on one device, without Ray, DeepSpeed or MLflow (and the
Self-Forcing stage the same way: `pipeline.single_distill`, subcommands `distill`, `export-student`).

For a machine that has torch and a GPU but not our cluster stack (the lent GPU boxes have no
package registry, and Ray's wheel alone exceeds what can be carried there). It drives the same
`TeacherStage` as `omniforcing train teacher` (noise draws, loss, cross-modal reliance, EMA), with
`TorchEngine` standing in for the DeepSpeed engine (same AdamW settings, warm-up + cosine schedule,
clipping, loss scaling under grad accumulation). Data are rendered in-process by the synthetic
world and encoded with a Bundle's fitted codecs (no mp4 round trip), so the run needs no shards.

    python -m pipeline.single render --clips 16384 --seed 1 --codecs pipeline/assets/demo-teacher \
        --out /tmp/latents
    python -m pipeline.single train --config configs/demo-teacher.yaml --latents /tmp/latents \
        --minutes 7 --out /tmp/run-a --set model.overrides.layers=6

`train` writes the EMA weights with the run's record (config, metric history, steps, wall time,
hardware) in the safetensors metadata, in files of at most 15 MiB; `export` turns them and the
codecs into a model Bundle, `log` records the run in MLflow afterwards (where MLflow is: the box
has none). Resume is not supported: a run is one sitting on one machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import single_distill
from pipeline.config import JobConfig, load_config, validate
from pipeline.parallelize import TorchEngine
from pipeline.single_record import SHIPPED, export, log_run, save_weights
from pipeline.stages import WorkerContext


@functools.lru_cache(maxsize=1)
def _codecs(bundle_dir: str) -> tuple[Any, Any]:
    """(video, audio) codecs of a Bundle, loaded once per worker process."""
    from model.bundle import Bundle

    b = Bundle.from_pretrained(bundle_dir)
    return b.video_codec, b.audio_codec


def _render(job: tuple[int, int, str, float]) -> tuple[str, np.ndarray, np.ndarray]:
    """One world clip → (caption, video latents [Fv,h,w,C], audio latents [Fa,C])."""
    from data.synth import clip_seed
    from data.world import render_clip

    seed, index, codecs, seconds = job
    torch.set_num_threads(1)  # one process per core already
    video, audio = _codecs(codecs)
    clip = render_clip(clip_seed(seed, index), seconds=seconds, height=64, width=64, max_balls=1)
    with torch.no_grad():
        v = video.encode(torch.from_numpy(clip.frames)).float().numpy()
        a = audio.encode(torch.from_numpy(clip.audio.astype(np.float32))).float().numpy()
    return str(clip.meta["caption"]), v, a


def render(clips: int, seed: int, codecs: str, out: Path, seconds: float = 5.04) -> None:
    """Render + encode `clips` world clips (seeds as `data synth --seed`) on every core."""
    jobs = [(seed, i, codecs, seconds) for i in range(clips)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        rows = list(pool.map(_render, jobs, chunksize=64))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "video.npy", np.stack([r[1] for r in rows]))
    np.save(out / "audio.npy", np.stack([r[2] for r in rows]))
    (out / "captions.json").write_text(json.dumps([r[0] for r in rows]))
    print(f"rendered {clips} clips into {out}", flush=True)


def _load_latents(d: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One `render` output → (video [N,Fv,h,w,C], audio [N,Fa,C], N captions)."""
    missing = [f for f in ("video.npy", "audio.npy", "captions.json") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"latents {d}: no {', '.join(missing)} (make them with `pipeline.single render`)"
        )
    return (
        np.load(d / "video.npy"),
        np.load(d / "audio.npy"),
        json.loads((d / "captions.json").read_text()),
    )


class RandomBatches:
    """Batches drawn without replacement, epoch by epoch, from in-memory latents: one `render`
    output or several, pooled (they must share clip shapes, i.e. codecs and clip length)."""

    def __init__(self, dirs: Path | Sequence[Path], batch_size: int, seed: int) -> None:
        dirs = [dirs] if isinstance(dirs, Path) else list(dirs)
        parts = [_load_latents(d) for d in dirs]
        for d, (v, a, _) in zip(dirs[1:], parts[1:], strict=True):
            if v.shape[1:] != parts[0][0].shape[1:] or a.shape[1:] != parts[0][1].shape[1:]:
                raise ValueError(
                    f"latents {d}: clips of shape video {v.shape[1:]} / audio {a.shape[1:]}, but "
                    f"{dirs[0]} has {parts[0][0].shape[1:]} / {parts[0][1].shape[1:]}"
                )
        self.video = np.concatenate([v for v, _, _ in parts]) if len(parts) > 1 else parts[0][0]
        self.audio = np.concatenate([a for _, a, _ in parts]) if len(parts) > 1 else parts[0][1]
        self.captions = np.array([c for _, _, caps in parts for c in caps])
        if batch_size > len(self.captions):
            where = ", ".join(str(d) for d in dirs)
            raise ValueError(
                f"data.batch_size={batch_size} exceeds the {len(self.captions)} clips in {where}"
            )
        self.batch_size, self.rng = batch_size, np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(len(self.captions)), 0

    def __call__(self) -> dict[str, Any]:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.captions)), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        keys = [f"clip-{i}" for i in idx]  # row index in the pooled latents (errors name it)
        batch = {"caption": self.captions[idx], "video": self.video[idx], "audio": self.audio[idx]}
        return {"key": keys} | batch


def with_steps(cfg: JobConfig, steps: int) -> JobConfig:
    """`cfg` with `train.steps` replaced (the calibrated cosine horizon), validated."""
    raw = cfg.to_dict()
    raw["train"]["steps"] = steps
    return validate(raw, source="calibrated horizon")


def train(
    cfg: JobConfig,
    latents: Path | Sequence[Path],
    minutes: float,
    out: Path,
    device: str,
    init: str | None = None,
) -> Path:
    """Train the teacher stage until `minutes` have passed (or `train.steps` are done); the
    cosine horizon is then set from the step rate measured over steps 10–60. `latents`: one or
    more `render` outputs, pooled. `init`: a teacher Bundle to start from (weights and EMA).
    Returns the weights prefix (`pipeline.single_record.save_weights`)."""
    from pipeline.stages.teacher import TeacherStage

    start = time.time()
    deadline = start + minutes * 60
    dev = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    ctx = WorkerContext(cfg, 0, 1, dev, torch.float32, {"make_engine": TorchEngine})
    stage = TeacherStage()
    stage.setup(ctx)
    if init:
        _load_init(stage, init)
    batches = RandomBatches(latents, cfg.data.batch_size, cfg.train.seed)
    prefix = out / "teacher"
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    record: dict[str, Any] = {
        "trained_by": "python -m pipeline.single train (TeacherStage on TorchEngine, one process)",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "clips": len(batches.captions),
        "init": init,
    }
    step, probe, t_probe, last_save, saved = 0, 60, 0.0, time.time(), -1
    while step < cfg.train.steps and time.time() < deadline:
        metrics = stage.train_step(step, batches, ctx)
        step += 1
        if step == 10:
            t_probe = time.time()
        if step == probe:  # horizon = the steps that fit in the time left
            rate = (time.time() - t_probe) / (probe - 10)
            cfg = with_steps(cfg, probe + int(0.93 * (deadline - time.time()) / rate))
            ctx.cfg = stage.engine.cfg = cfg
            print(f"{rate * 1e3:.1f} ms/step: horizon {cfg.train.steps} steps", flush=True)
        if step % cfg.train.log_every == 0 or "reliance/audio_on_video" in metrics:
            history.append({"step": step, **metrics})
        if step % (cfg.train.log_every * 10) == 0:
            print(json.dumps({"step": step, **{k: round(v, 4) for k, v in metrics.items()}}))
        if time.time() - last_save > 120 or step >= cfg.train.steps:
            _checkpoint(stage, cfg, record, history, step, start, prefix)
            last_save, saved = time.time(), step
    if saved != step:
        _checkpoint(stage, cfg, record, history, step, start, prefix)
    return prefix


def _load_init(stage: Any, init: str) -> None:
    """Start from a Bundle's weights (a Bundle holds EMA weights: live and EMA both start there)."""
    from model.bundle import Bundle

    src = Bundle.from_pretrained(init)
    net = stage.engine.module
    net.dit.load_state_dict(src.model.state_dict())
    net.text.load_state_dict(src.text_encoder.state_dict())
    for ema in stage.emas().values():
        ema.load({n: p.detach() for n, p in net.named_parameters()}, init)


def _checkpoint(
    stage: Any,
    cfg: JobConfig,
    record: dict[str, Any],
    history: list[dict[str, float]],
    step: int,
    start: float,
    prefix: Path,
    role: str = "teacher",
) -> None:
    """`role`'s EMA (else live) weights + the record so far, at `prefix` (see `_save`)."""
    from pipeline.parallelize import gather_full

    ema = stage.emas().get(role)
    state = gather_full(stage.engine.module, ema.state() if ema else None)
    wall = time.time() - start
    info = {"config": cfg.to_dict(), "steps": step, "wall_s": round(wall, 1)}
    save_weights(state, record | info | {"metrics": history}, prefix)
    print(f"saved step {step} ({wall / 60:.1f} min) at {prefix}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render + encode world clips into .npy latents")
    r.add_argument("--clips", type=int, required=True)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--codecs", default=SHIPPED, help="a Bundle dir")
    r.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train", help="train the teacher stage for a wall-clock budget")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", default=[], dest="overrides")
    t.add_argument(
        "--latents",
        type=Path,
        action="append",
        required=True,
        help="a `render` output; repeat to pool several",
    )
    t.add_argument("--minutes", type=float, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--init", default=None, help="a teacher Bundle dir to start from")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (parallel runs)")
    e = sub.add_parser("export", help="weights from `train` → a model Bundle")
    e.add_argument("--weights", type=Path, required=True, help="<out>/teacher of `train`")
    e.add_argument("--codecs", default=SHIPPED)
    e.add_argument("--out", type=Path, required=True)
    single_distill.add_parsers(sub)
    g = sub.add_parser("log", help="record a `train` output as a finished MLflow teacher run")
    g.add_argument("--weights", type=Path, required=True, help="<out>/teacher of `train`")
    g.add_argument("--codecs", default=SHIPPED)
    g.add_argument("--tracking-uri", default=None, help="else the config's / $MLFLOW_TRACKING_URI")
    a = ap.parse_args(argv)
    try:
        _run(a)
    except (ValueError, FileNotFoundError) as err:  # config errors name their key path
        raise SystemExit(f"error: {err}") from None


def _run(a: argparse.Namespace) -> None:
    if a.cmd == "render":
        render(a.clips, a.seed, a.codecs, a.out)
    elif a.cmd == "train":
        cfg = load_config(a.config, a.overrides)
        if a.threads:  # several runs on one box: oversubscribed OpenMP threads spin-wait
            torch.set_num_threads(a.threads)
        train(cfg, a.latents, a.minutes, a.out, a.device, a.init)
    elif a.cmd in single_distill.COMMANDS:
        single_distill.run(a)
    elif a.cmd == "export":
        print(export(a.weights, a.codecs, a.out))
    else:
        print(log_run(a.weights, a.codecs, a.tracking_uri))


if __name__ == "__main__":
    main()
