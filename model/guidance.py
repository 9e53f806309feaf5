"""Guidance of the bidirectional teacher, in one place: per-modality CFG and autoguidance.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
the teacher's conditional velocity is pushed away from the conditional velocity of a weaker
version of itself (here an earlier checkpoint of the same training run), on top of CFG:

    v = c + (s − 1)(c − u) + w (c − c_guide)        per modality, s = its CFG scale

CFG pushes away from the unconditional prediction (prompt adherence); the guide's errors are the
ones the teacher has not finished unlearning, so pushing away from them sharpens what the teacher
is least sure of — for the embedded default, the timing of a contact inside a 333 ms video latent
(benchmarks/RESULTS.md, issue 8). Costs one more forward over the conditional rows per step.

- `Guide`: the weaker DiT with its own text encoder (trained with it) and the weight w; a Bundle
  may carry one (`Bundle.guide`), so every teacher sampler uses what the bundle ships.
- `teacher_velocity`: the guided velocities at per-frame σ; the whole-clip sampler
  (model.sampling), the ODE trajectories and the DMD real score all call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import flow
from .dit import AVDiT
from .text import WordTextEncoder

Text = tuple[torch.Tensor, torch.Tensor | None]  # (emb [B, L, D], mask [B, L] bool)


@dataclass
class Guide:
    """A weaker teacher for autoguidance: its DiT, its own text encoder and the weight w."""

    model: AVDiT
    text_encoder: WordTextEncoder
    weight: float

    def bind(self, prompts: Sequence[str]) -> BoundGuide:
        """The guide with `prompts` encoded by its own encoder (one row per prompt)."""
        with torch.no_grad():
            return BoundGuide(self.model, self.text_encoder(list(prompts)), self.weight)

    def to(self, device=None, dtype=None) -> Guide:
        self.model.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        return self


@dataclass
class BoundGuide:
    """A `Guide` with the batch's prompts encoded: what `teacher_velocity` takes."""

    model: AVDiT
    text: Text
    weight: float


def bind(guide: Guide | None, prompts: Sequence[str]) -> BoundGuide | None:
    """`guide` bound to `prompts`, or None for a teacher without one (plain CFG)."""
    return guide.bind(prompts) if guide is not None else None


def stack_text(a: Text, b: Text) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two (emb [B,L,D], mask [B,L]) batches, padding to the longer L; `b` may be
    one row (the null prompt), broadcast to `a`'s batch."""
    (ea, ma), (eb, mb) = a, b
    ma = torch.ones(ea.shape[:2], dtype=torch.bool, device=ea.device) if ma is None else ma
    mb = torch.ones(eb.shape[:2], dtype=torch.bool, device=eb.device) if mb is None else mb
    length = max(ea.shape[1], eb.shape[1])

    def pad(e, m):
        extra = length - e.shape[1]
        if extra:
            e = torch.cat([e, e.new_zeros(e.shape[0], extra, e.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], extra)], dim=1)
        return e, m

    (ea, ma), (eb, mb) = (
        pad(ea, ma),
        pad(eb.expand(ea.shape[0], -1, -1), mb.expand(ea.shape[0], -1)),
    )
    return torch.cat([ea, eb]), torch.cat([ma, mb])


def _run(net: AVDiT, xv, xa, sv, sa, emb, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The network in its own dtype (bf16 on a GPU teacher); velocities back in x_t's dtype."""
    dt = next(net.parameters()).dtype
    vv, va = net(xv.to(dt), xa.to(dt), sv, sa, emb.to(dt), mask)
    return vv.to(xv.dtype), va.to(xa.dtype)


def teacher_velocity(
    model: AVDiT,
    xv: torch.Tensor,
    xa: torch.Tensor,
    sv: torch.Tensor,
    sa: torch.Tensor,
    text: Text,
    null: Text | None,
    scales: tuple[float, float],
    guide: BoundGuide | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided velocities (video [B,Fv,h,w,C], audio [B,Fa,C]) at per-frame σ sv [B,Fv], sa [B,Fa].

    CFG (LTX-2 rule c + (s−1)(c−u)) with cond and uncond rows as one batch, plus autoguidance
    w(c − c_guide) when `guide` is given. Only the networks run in their dtype: CFG and the
    guidance sum are formed at x_t's precision (an fp32 ODE state stays fp32).
    """
    b = xv.shape[0]
    if null is None or tuple(scales) == (1.0, 1.0):
        cv, ca = _run(model, xv, xa, sv, sa, *text)
        gv, ga = cv, ca
    else:
        emb, mask = stack_text(text, null)  # cond rows first, then uncond
        two = (torch.cat([xv, xv]), torch.cat([xa, xa]), torch.cat([sv, sv]), torch.cat([sa, sa]))
        vv, va = _run(model, *two, emb, mask)  # [2B, Fv, h, w, C], [2B, Fa, C]
        cv, ca = vv[:b], va[:b]
        gv, ga = flow.guided(cv, vv[b:], scales[0]), flow.guided(ca, va[b:], scales[1])
    if guide is not None and guide.weight:
        wv, wa = _run(guide.model, xv, xa, sv, sa, *guide.text)
        gv, ga = gv + guide.weight * (cv - wv), ga + guide.weight * (ca - wa)
    return gv, ga
