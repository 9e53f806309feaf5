"""Fit a `CellDrawer` (model.codecs.drawer) for a bundle's or codec folder's video codec on
synthetic-world clips, measure what it changes, and write the codec back with it.

`omniforcing data fit-drawer` calls `fit_and_save`. The latent space is untouched (the encoder and
its standardisation stay), so a teacher and every student distilled from it stay valid: only
`decode` draws differently. Measured on held-out clips of the same world: PSNR and the brightest
pixel of the linear decode and of the drawn decode against the true frames, plus a PNG strip
(true / linear / drawn frames of one clip). Deliberately not here: the network and its training
loop (model.codecs.drawer), printing (data/cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.world import render_clip
from model.codecs import CellVideoCodec, load_codecs, save_codecs
from model.codecs.drawer import fit_drawer

HELD_OUT_SEED = 900_000  # evaluation clips never seen in fitting (fitting starts at `seed`)


def world_clips(codec: CellVideoCodec, seed: int, balls: int) -> Callable[[int], torch.Tensor]:
    """clip i → uint8 frames [F, H, W, 3] of world seed `seed + i` at the codec's size."""

    def clip(i: int) -> torch.Tensor:
        c = render_clip(seed + i, height=codec.height, width=codec.width, max_balls=balls)
        return torch.as_tensor(c.frames)

    return clip


def round_trip(codec: CellVideoCodec, clips: list[torch.Tensor]) -> dict[str, float]:
    """PSNR (dB, all pixels) and the clip's peak / the true peak, averaged over clips."""
    psnr, peak = [], []
    for frames in clips:
        rec = codec.decode(codec.encode(frames)).float()
        mse = float(((rec - frames.float()) ** 2).mean())
        psnr.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
        peak.append(float(rec.max()) / max(float(frames.max()), 1.0))
    return {"psnr_db": float(np.mean(psnr)), "peak_ratio": float(np.mean(peak))}


def strip(codecs: dict[str, CellVideoCodec], frames: torch.Tensor, out: Path, n: int = 8) -> None:
    """A PNG: one row per decode (true frames first), n frames spread over the clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"true": frames} | {k: c.decode(c.encode(frames)) for k, c in codecs.items()}
    idx = np.linspace(0, frames.shape[0] - 1, n).round().astype(int)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (name, clip) in enumerate(rows.items()):
        for c, i in enumerate(idx):
            ax = axes[r][c]
            ax.imshow(clip[i].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"frame {i}", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _load(source: Path) -> tuple[Any, CellVideoCodec]:
    """(holder, video codec) of a bundle folder or a codec folder (codec.json)."""
    if (source / "codec.json").is_file():
        video, audio = load_codecs(source)
        return ("codecs", audio), video
    from model.bundle import Bundle

    bundle = Bundle.from_pretrained(source)
    return ("bundle", bundle), bundle.video_codec


def _save(holder: tuple[str, Any], video: CellVideoCodec, source: Path, out: Path) -> None:
    kind, obj = holder
    if kind == "codecs":
        save_codecs(out, video, obj)
        return
    config = json.loads((source / "config.json").read_text())
    extra = config.get("extra", {})
    dtype = getattr(torch, extra.get("weights_dtype", "float32"))  # keep the stored precision
    obj.video_codec = video
    obj.save_pretrained(out, extra=extra, weights_dtype=dtype)


def fit_and_save(
    source: str,
    out: str,
    steps: int,
    batch: int = 16,
    width: int = 48,
    seed: int = 0,
    balls: int = 2,
    eval_clips: int = 16,
    record: str | None = None,
    progress: Callable[[int, float], None] | None = None,
    context: int = 0,
    noise: float = 0.0,
    boundary: float = 0.0,
    warm: bool = False,
    lr: float = 1e-3,
    consistency: float = 0.0,
) -> dict[str, Any]:
    """Fit a drawer for the video codec at `source`, write the codec (or bundle) to `out`, and
    drawer-fit.json + drawer-strip.png to `record` (default: `out`).

    `context`, `noise`, `boundary`, `consistency`: see model.codecs.drawer.fit_drawer. `warm`: start from the
    drawer `source` already has (its width), which then also appears in the report and strip."""
    src = Path(source)
    holder, codec = _load(src)
    if not isinstance(codec, CellVideoCodec):
        raise ValueError(f"{source}: video codec is {type(codec).__name__}, not CellVideoCodec")
    if warm and codec.drawer is None:
        raise ValueError(f"{source}: --warm needs a codec that already has a drawer")
    linear = codec.with_drawer(None)
    net = fit_drawer(linear, world_clips(linear, seed, balls), steps, batch, lr=lr, width=width,
                     seed=seed, progress=progress, context=context, noise=noise,
                     boundary=boundary, init=codec.drawer if warm else None,
                     consistency=consistency)  # fmt: skip
    drawn = linear.with_drawer(net)
    held = [world_clips(linear, HELD_OUT_SEED, balls)(i) for i in range(eval_clips)]
    options = dict(batch=batch, lr=lr, seed=seed, balls=balls, context=context, noise=noise)
    options |= dict(boundary=boundary, consistency=consistency, warm=warm)
    report = {
        "steps": steps,
        "fit_seconds": round(net.fit_seconds, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
        "options": options,
        "linear": round_trip(linear, held),
        "drawn": round_trip(drawn, held),
        "eval_clips": eval_clips,
    }
    decodes = {"linear": linear}
    if warm:
        report["before"] = round_trip(codec, held)
        decodes["before"] = codec
    _save(holder, drawn, src, Path(out))
    rec = Path(record or out)
    strip(decodes | {"drawn": drawn}, held[0], rec / "drawer-strip.png")
    (rec / "drawer-fit.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report
