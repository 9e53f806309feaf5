"""`CellDrawer`: a learned decoder for `CellVideoCodec` latents that draws crisp frames.

The linear decode (cell means + DCT luma residual, bilinearly upsampled) is a right inverse of
the encoder, but a ball of radius 4-6 px spread over 8 × 8-pixel cells comes back as a dim smudge
(peak ≈ 70 of 255, PSNR ≈ 22 dB on world clips). The latent still fixes where the ball is: which
cells it covers, by how much, and how its luminance moves within the 8-frame group. `CellDrawer`
learns that inverse: a small convolutional net reads one latent [g, g, 6] (standardised) and adds
a correction to the linear decode of the same latent at pixel resolution.

Two kinds, told apart by `spec["context"]`:
- context 0 (the first drawer, session 13): each latent is drawn alone. Where a generated latent
  is ambiguous, consecutive groups can place the ball apart, so it jumps at group boundaries.
- context 1: the drawer also reads the PREVIOUS latent (with "has a previous one" and "the previous
  one is the lone first latent" flags), never a later one, so a group's first frames can continue
  where the last group ended. Still chunk-local: a streamed chunk carries the last latent of the
  chunk before it (`CellVideoCodec.context_latents`, model.streaming.ChunkDecoder), and streaming
  decode equals whole-clip decode bit for bit.
`fit_drawer` trains either from clips; for context 1 on pairs of consecutive groups, optionally on
noised latents (generated latents are off the encoder's manifold) and with a loss on the frame step
across the boundary. Torch only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FRAMES = 8  # pixel frames per (non-lone) latent


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(F.silu(self.a(F.silu(x))))


class CellDrawer(nn.Module):
    """[N, 6 + 1 (+ 6 + 2), g, g] (standardised latent + lone flag, and with `context` the
    previous latent + has-previous and previous-is-lone flags) → [N, 8·3, g·s, g·s] correction.

    `scale` s = pixels per cell, a power of two: log2(s) nearest-upsample + conv stages.
    `width` is the channel count at the cell grid, halved (down to 16) at each stage.
    `context` 0 or 1: how many previous latents it reads (0: the spec has no "context" key, as
    drawers saved before it had none).
    """

    def __init__(
        self, latent_channels: int = 6, scale: int = 8, width: int = 96, context: int = 0
    ) -> None:
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"CellDrawer: pixels per cell must be a power of two, got {scale}")
        if context not in (0, 1):
            raise ValueError(f"CellDrawer: context must be 0 or 1 previous latents, got {context}")
        self.spec = {"latent_channels": latent_channels, "scale": scale, "width": width}
        if context:
            self.spec["context"] = context
        self.context = context
        self.stem = nn.Conv2d(latent_channels + 1 + context * (latent_channels + 2), width, 3,
                              padding=1)  # fmt: skip
        self.body = nn.Sequential(_Res(width), _Res(width))
        ups, c = [], width
        for _ in range(int(math.log2(scale))):
            nxt = max(16, c * 2 // 3)
            ups += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c, nxt, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(nxt, nxt, 3, padding=1),
                nn.SiLU(),
            ]
            c = nxt
        self.up = nn.Sequential(*ups)
        self.head = nn.Conv2d(c, FRAMES * 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as the linear decode
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        z: torch.Tensor,
        lone: torch.Tensor,
        prev: torch.Tensor | None = None,
        has_prev: torch.Tensor | None = None,
        prev_lone: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z [N, g, g, C] standardised latents, lone [N] bool → [N, 8, H, W, 3] correction.

        With context: prev [N, g, g, C] the latent before each (ignored where has_prev [N] is
        False), prev_lone [N] bool; None for all three means no previous latent."""

        def flag(b: torch.Tensor) -> torch.Tensor:
            return b.float()[:, None, None, None].expand(-1, 1, *z.shape[1:3])

        parts = [z.permute(0, 3, 1, 2), flag(lone)]
        if self.context:
            if prev is None or has_prev is None:
                prev, has_prev = torch.zeros_like(z), torch.zeros_like(lone)
                prev_lone = torch.zeros_like(lone)
            keep = has_prev.float()[:, None, None, None]
            parts += [prev.permute(0, 3, 1, 2) * keep, flag(has_prev), flag(prev_lone & has_prev)]
        x = torch.cat(parts, 1)
        y = self.head(self.up(self.body(F.silu(self.stem(x)))))  # [N, 24, H, W]
        n, _, h, w = y.shape
        return y.view(n, FRAMES, 3, h, w).permute(0, 1, 3, 4, 2)

    def load_from(self, other: CellDrawer) -> CellDrawer:
        """Start from `other`'s weights (same width and scale): its stem's input channels are
        copied, any extra context channels start at zero, so this draws exactly as `other` does
        until trained (a drawer without context warm-starts one with context)."""
        state = other.state_dict()
        w = state["stem.weight"]
        stem = torch.zeros_like(self.stem.weight)
        stem[:, : w.shape[1]] = w
        self.load_state_dict(state | {"stem.weight": stem})
        return self


def _pairs(
    clips: Callable[[int], torch.Tensor], encode: Callable, pairs: int, generator: torch.Generator
) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Endless lists of `pairs` consecutive-group pairs from clip i = clips(i) (uint8 [F,H,W,3]):
    (z_before [g,g,C] or None, z_a, z_b, a index j-1, target_a [8,H,W,3], target_b), where a
    is latent j-1 and b latent j of one clip (latent 0 is the lone first frame, its target that
    frame repeated 8 times)."""
    pool: list[tuple[Any, ...]] = []
    i = 0
    while True:
        while len(pool) < 4 * pairs:
            frames = clips(i)
            i += 1
            z = encode(frames)  # [1 + k, g, g, C]
            x = frames.float() / 255.0
            t = [x[:1].expand(FRAMES, *x.shape[1:])] + list(x[1:].reshape(-1, FRAMES, *x.shape[1:]))
            for j in range(1, z.shape[0]):
                pool.append((z[j - 2] if j >= 2 else None, z[j - 1], z[j], j - 1, t[j - 1], t[j]))
        order = torch.randperm(len(pool), generator=generator)
        take = [pool[k] for k in order[:pairs].tolist()]
        pool = [pool[k] for k in order[pairs:].tolist()]
        yield take


def _pair_batch(
    take: list[tuple[Any, ...]], linear: Callable, noise: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Stack pairs into the inputs of draw a (after its previous latent) and draw b (after a),
    with half the pairs' latents noised by σ ~ U(0, noise) (the same σ for a pair's latents)."""
    keys = ("za", "zb", "pa", "ha", "pl", "la", "ta", "tb", "ba", "bb")
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for before, za, zb, ja, ta, tb in take:
        sigma = 0.0
        if noise > 0 and float(torch.rand((), generator=generator)) < 0.5:
            sigma = noise * float(torch.rand((), generator=generator))
        zs = [before if before is not None else torch.zeros_like(za), za, zb]
        zs = [z + sigma * torch.randn(z.shape, generator=generator) for z in zs]
        rows["pa"].append(zs[0])
        rows["za"].append(zs[1])
        rows["zb"].append(zs[2])
        rows["ha"].append(torch.tensor(ja >= 1))  # a has a previous latent
        rows["pl"].append(torch.tensor(ja == 1))  # ... and it is the lone first one
        rows["la"].append(torch.tensor(ja == 0))
        rows["ta"].append(ta)
        rows["tb"].append(tb)
        rows["ba"].append(linear(zs[1], ja == 0))
        rows["bb"].append(linear(zs[2], False))
    return {k: torch.stack(v) for k, v in rows.items()}


def _draw_pair(net: CellDrawer, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn frames (clamped) of both groups of a pair batch: [N, 8, H, W, 3] each."""
    no = torch.zeros(b["za"].shape[0], dtype=torch.bool)
    a = b["ba"] + net(b["za"], b["la"], b["pa"], b["ha"], b["pl"])
    bb = b["bb"] + net(b["zb"], no, b["za"], ~no, b["la"])  # b follows a
    return a.clamp(0.0, 1.0), bb.clamp(0.0, 1.0)


def fit_drawer(
    codec: Any,
    clips: Callable[[int], torch.Tensor],
    steps: int,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    width: int = 48,
    progress: Callable[[int, float], None] | None = None,
    context: int = 0,
    noise: float = 0.0,
    boundary: float = 0.0,
    init: CellDrawer | None = None,
    consistency: float = 0.0,
) -> CellDrawer:
    """Train a `CellDrawer` for `codec` (a fitted CellVideoCodec) on clips(i), i = 0, 1, ...

    Each step draws `batch` latents as batch / 2 pairs of consecutive groups (a, b) of one clip.
    Loss: MSE between clamp(linear + correction) and the true frames (the lone first latent's
    target is its one frame repeated). Not L1: the ball is ~1 % of the pixels, and L1 is
    lowered most by tidying the background while the ball gets worse (seen: L1 fell, MSE rose).
    `boundary` weighs a second term: MSE of the frame step across the boundary (b's first
    frame − a's last) against the true step, so the ball moves on where the last group left it.
    `noise`: half the pairs are drawn from latents + σ·N(0, 1), σ ~ U(0, noise) (standardised
    units), so the drawer keeps drawing one ball on latents a generator made. `consistency`
    weighs a third term: the drawn frames, encoded again (`codec.encode_groups`), against the
    (noised) latents they were drawn from, in standardised units: a drawing the latent does not
    describe (a ball moved earlier or later than the latent's luminance says) costs, so on
    latents off the encoder's manifold the drawer keeps their timing as the linear decode does,
    where the MSE alone would redraw the clip it guesses. `init`: warm start
    from a fitted drawer (`CellDrawer.load_from`; its width wins). AdamW, one-cycle schedule;
    `progress(step, loss)` per step.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        width = int(init.spec["width"]) if init is not None else width
        net = CellDrawer(codec.latent_channels, codec.height // codec.grid, width, context)
    if init is not None:
        net.load_from(init)
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    data = _pairs(clips, codec.encode, max(1, batch // 2), g)
    t0 = time.time()
    for step in range(1, steps + 1):
        b = _pair_batch(next(data), codec.linear_frames, noise, g)
        pa, pb = _draw_pair(net, b)
        loss = 0.5 * ((pa - b["ta"]).pow(2).mean() + (pb - b["tb"]).pow(2).mean())
        if boundary > 0:
            last = torch.where(b["la"][:, None, None, None], pa[:, 0], pa[:, -1])
            t_last = torch.where(b["la"][:, None, None, None], b["ta"][:, 0], b["ta"][:, -1])
            step_err = (pb[:, 0] - last) - (b["tb"][:, 0] - t_last)
            loss = loss + boundary * step_err.pow(2).mean()
        if consistency > 0:
            no = torch.zeros_like(b["la"])
            back = torch.cat([codec.encode_groups(pa, b["la"]), codec.encode_groups(pb, no)])
            loss = loss + consistency * (back - torch.cat([b["za"], b["zb"]])).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    net.fit_seconds = time.time() - t0
    return net.eval().requires_grad_(False)
