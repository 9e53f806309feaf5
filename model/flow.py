"""Flow-matching maths, pure and shared by training, distillation and serving.

Convention (rectified flow, LTX-2): x_σ = (1 − σ)·x0 + σ·ε; the network predicts v = ε − x0, so
x0 = x_σ − σ·v. σ = 1 is pure noise, σ = 0 clean. CFG follows LTX-2: c + (s − 1)(c − u).
Noise is always drawn from an explicit CPU `torch.Generator` and then moved, so a seed gives the
same numbers on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# The student's few-step σ list (paper-era V1 code: timesteps 1000/757/522 → σ 1.0/0.75/0.545).
DEFAULT_STUDENT_SIGMAS: tuple[float, ...] = (1.0, 0.7507, 0.5448)


def _b(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Broadcast a per-frame σ [B, F] (or [B]) against x [B, F, ...]."""
    if not torch.is_tensor(sigma):
        return sigma
    return sigma.to(x.dtype).reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    s = _b(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - _b(sigma, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    return (x_t - x0) / _b(sigma, x_t)


def randn(shape: Sequence[int], generator: torch.Generator, device=None, dtype=None):
    """Gaussian noise from a CPU generator, moved to `device` (device-independent numbers)."""
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def shift_sigma(sigma_lin: torch.Tensor, shift: float) -> torch.Tensor:
    """LTX-2's token-dependent shift: σ = e^s / (e^s + 1/σ_lin − 1)."""
    es = math.exp(shift)
    return torch.where(sigma_lin > 0, es / (es + 1.0 / sigma_lin.clamp(min=1e-12) - 1.0), 0.0)


def ltx2_shift(n_tokens: int) -> float:
    """Shift interpolated linearly in token count: 0.95 at 1024 tokens → 2.05 at 4096."""
    t = (n_tokens - 1024) / (4096 - 1024)
    return 0.95 + t * (2.05 - 0.95)


def ltx2_sigmas(steps: int, n_tokens: int = 4096, terminal: float = 0.1) -> torch.Tensor:
    """[steps + 1] decreasing σ from 1 to 0: shifted, non-zero part stretched to end at `terminal`."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    lin = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    s = shift_sigma(lin, ltx2_shift(n_tokens))
    nz = s[:-1]
    one_minus = 1.0 - nz
    scale = one_minus[-1] / (1.0 - terminal)
    s[:-1] = 1.0 - one_minus / scale
    return s.float()


def sigma_from_timestep(t: torch.Tensor, n_tokens: int = 4096) -> torch.Tensor:
    """DMD's σ for integer timesteps t ∈ [0, 1000] under the LTX-2 shift (a lookup, no table)."""
    return shift_sigma(t.double() / 1000.0, ltx2_shift(n_tokens)).float()


def logit_normal(shape: Sequence[int], generator: torch.Generator, mean=0.0, std=1.0):
    """Training σ ~ logit-normal (SD3/LTX practice), in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(tuple(shape), generator=generator))


def guided(c: torch.Tensor, u: torch.Tensor | None, scale: float) -> torch.Tensor:
    """LTX-2 CFG: c + (s − 1)(c − u); scale 1 (or no u) is the conditional prediction."""
    if u is None or scale == 1.0:
        return c
    return c + (scale - 1.0) * (c - u)


Denoiser = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def euler_sample(
    velocity: Denoiser,
    noise_v: torch.Tensor,
    noise_a: torch.Tensor,
    sigmas: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step Euler from σ[0] to σ[-1]. `velocity(x_v, x_a, σ)` returns (guided) velocities."""
    xv, xa = noise_v, noise_a
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        vv, va = velocity(xv, xa, s)
        xv = xv + (s_next - s) * vv.to(xv.dtype)
        xa = xa + (s_next - s) * va.to(xa.dtype)
    return xv, xa


def few_step(
    predict_x0: Denoiser,
    noise_v: torch.Tensor,
    noise_a: torch.Tensor,
    sigmas: Sequence[float],
    generator: torch.Generator,
    stop_at: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's few-step sampler (Self-Forcing style): predict x0, re-noise at the next σ.

    `stop_at` = index of the last step to run (the exit step of a Self-Forcing rollout); its x0 is
    the result. Re-noising draws fresh ε from `generator` at each step.
    """
    last = len(sigmas) - 1 if stop_at is None else stop_at
    if not 0 <= last < len(sigmas):
        raise ValueError(f"exit step {last} outside the {len(sigmas)}-step σ list")
    xv, xa = noise_v, noise_a
    for i, s in enumerate(sigmas[:last]):
        with torch.no_grad():  # only the exit step keeps gradients (stochastic truncation)
            x0v, x0a = predict_x0(xv, xa, s)
        nxt = sigmas[i + 1]
        xv = add_noise(x0v, randn(xv.shape, generator, xv.device, xv.dtype), nxt)
        xa = add_noise(x0a, randn(xa.shape, generator, xa.device, xa.dtype), nxt)
    return predict_x0(xv, xa, sigmas[last])
