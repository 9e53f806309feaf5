"""The student's side of Self-Forcing's generator step (`pipeline.stages.self_forcing`): its
whole-clip rollout and the per-frame DMD noise levels.

- `rollout`: the causal student streams a clip with its own KV cache through
  `model.streaming.rollout_blocks` (the loop serving uses), gradient only at the exit step.
- `PrefixPinned`: a student view whose block-0 denoising returns the clip's clean prefix
  (`distill.prefix: clean_from_teacher`).
- `noise_levels`: per-frame σ from per-sample σ, earlier blocks clean under last-block scope.
No losses (pipeline.distill.dmd) and no engines live here.
"""

from __future__ import annotations

import torch

from model import AVDiT, rollout_blocks


class PrefixPinned:
    """A student view whose block-0 denoising calls return the clean prefix (v = (x − x0)/σ);
    every other call, and block 0's commit, runs the student itself."""

    def __init__(self, model: AVDiT, v0: torch.Tensor, a0: torch.Tensor) -> None:
        self.model, self.cfg = model, model.cfg
        self.v0, self.a0 = v0, a0  # [B, 1, h, w, C], [B, 1, C]

    def parameters(self):
        return self.model.parameters()

    def forward_block(self, xv, xa, sv, sa, block, cache, commit=False):
        if block == 0 and not commit:
            s = sv[:, :1].to(xv.dtype)  # [B, 1]; σ > 0 on every denoising step
            return (xv - self.v0) / s[..., None, None, None], (xa - self.a0) / s[..., None]
        return self.model.forward_block(xv, xa, sv, sa, block, cache, commit)


def rollout(
    student: AVDiT,
    text: tuple[torch.Tensor, torch.Tensor],
    seconds: int,
    sigmas: list[float],
    g: torch.Generator,
    exit_step: int,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's clip x̂: video [B, Fv, h, w, C], audio [B, Fa, C] (gradient at exit step)."""
    cache = student.new_cache(text[0], text[1], seconds)
    model = student if prefix is None else PrefixPinned(student, *prefix)
    vs, as_ = [], []
    for _, xv, xa in rollout_blocks(
        model, cache, seconds, sigmas, g, exit_step, batch=text[0].shape[0]
    ):
        vs.append(xv)
        as_.append(xa)
    return torch.cat(vs, 1), torch.cat(as_, 1)


def noise_levels(
    sigma: torch.Tensor, fv: int, fa: int, last: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame σ [B,Fv], [B,Fa] from per-sample σ [B]; `last` = (first video, first audio
    frame) of the last block: earlier frames stay clean (σ = 0) under last-block scope."""
    sv = sigma[:, None].expand(-1, fv).clone()
    sa = sigma[:, None].expand(-1, fa).clone()
    if last is not None:
        sv[:, : last[0]], sa[:, : last[1]] = 0.0, 0.0
    return sv, sa
