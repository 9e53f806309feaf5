"""Pure distillation losses: DMD generator loss, critic flow-matching loss, ODE regression loss.

Every function here maps tensors to tensors: no networks, no engines, no RNG of its own (noise
and σ come in as arguments). Shapes: a latent `x` is video [B, Fv, h, w, C] or audio [B, Fa, C];
per-frame σ is [B, F]. What it deliberately does not do: run the teacher, critic or student
(pipeline.stages.*), draw timesteps (callers pass a generator to `sample_sigma`).
"""

from __future__ import annotations

import torch

from model import flow


def per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] → [B, 1, ...] (broadcastable) mean absolute value over all but the batch dim."""
    return x.abs().flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's x0-form gradient g = (x0_fake − x0_real) / mean|x̂ − x0_real| (per sample).

    The normaliser (DMD eq. 8) is the per-sample mean over every element of this modality;
    `nan_to_num` guards an all-zero residual. Returned detached, same shape as x_hat.
    """
    with torch.no_grad():
        norm = per_sample_mean_abs(x_hat.float() - x0_real.float())
        g = (x0_fake.float() - x0_real.float()) / (norm + 1e-8)
        return torch.nan_to_num(g).to(x_hat.dtype)


def dmd_loss(
    x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, g): loss = 0.5·mean((x̂ − sg(x̂ − g))²), so ∂loss/∂x̂ = g / x̂.numel().

    Gradients reach the generator only through `x_hat`; the real and fake predictions are
    treated as constants (they are computed without gradient by the caller anyway).
    """
    g = dmd_gradient(x_hat, x0_real, x0_fake)
    target = (x_hat - g).detach()
    loss = 0.5 * (x_hat.float() - target.float()).pow(2).mean()
    return loss, g


def critic_loss(
    x0_pred: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    x_hat: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching loss of the critic on detached generator samples.

    flow = (x_t − x0_pred)/σ is compared with the true velocity ε − x̂; `sigma` is per frame
    [B, F]; frames with σ = 0 (clean context, e.g. last-block scope) are masked out. `mask`
    [B, F] bool further restricts the supervised frames.
    """
    keep = sigma > 1e-6 if mask is None else (sigma > 1e-6) & mask  # [B, F]
    safe = torch.where(keep, sigma, torch.ones_like(sigma))
    pred = flow.velocity_from_x0(x_t.float(), x0_pred.float(), safe.float())
    target = flow.velocity_target(x_hat.float().detach(), noise.float())
    return masked_mse(pred, target, keep)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the frames where `keep` [B, F] is true (0 if none are)."""
    err = (pred.float() - target.float()).pow(2)  # [B, F, ...]
    per_frame = err.flatten(2).mean(2) if err.dim() > 2 else err  # [B, F]
    w = keep.to(per_frame.dtype)
    return (per_frame * w).sum() / w.sum().clamp(min=1.0)


def ode_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ODE regression: MSE(x0_pred, x0_teacher) over frames with σ > 1e-6 ([B, F] σ)."""
    return masked_mse(x0_pred, x0_target, sigma > 1e-6)


def sample_sigma(
    batch: int, generator: torch.Generator, n_tokens: int, t_min: int = 20, t_max: int = 980
) -> torch.Tensor:
    """[B] σ for DMD/critic: integer t ~ U{t_min..t_max} through the LTX-2 shifted schedule."""
    t = torch.randint(t_min, t_max + 1, (batch,), generator=generator)
    return flow.sigma_from_timestep(t, n_tokens)
