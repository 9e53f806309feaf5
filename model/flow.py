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


def student_sigmas_ok(sigmas: object) -> bool:
    """A usable few-step σ list: a non-empty sequence of numbers in (0, 1], strictly decreasing
    (the rule for `distill.student_sigmas` and a bundle's `sampler.sigmas`)."""
    if not isinstance(sigmas, (list, tuple)) or not sigmas:
        return False
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sigmas):
        return False
    pairs = zip(sigmas, sigmas[1:], strict=False)
    return all(0 < x <= 1 for x in sigmas) and all(a > b for a, b in pairs)


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
    if steps == 1:  # no non-zero σ below 1 to stretch: one step from noise to clean
        return torch.tensor([1.0, 0.0])
    lin = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    s = shift_sigma(lin, ltx2_shift(n_tokens))
    nz = s[:-1]
    one_minus = 1.0 - nz
    scale = one_minus[-1] / (1.0 - terminal)
    s[:-1] = 1.0 - one_minus / scale
    return s.float()


def staggered_sigmas(
    table: torch.Tensor, tau: torch.Tensor, delta: torch.Tensor, n_frames: int
) -> torch.Tensor:
    """Per-frame σ [B, F] of a staggered schedule (earlier frames cleaner, as in diffusion forcing).

    Frame f of F sits at relative time u = f / (F − 1) and has progress p = clamp(τ(1 + Δ) − Δu,
    0, 1) along `table` (a decreasing σ table, `ltx2_sigmas`), interpolated linearly; Δ = 0 is the
    joint schedule (every frame at table(τ)). τ, Δ: [B]. The teacher stage trains at these σ and
    `euler_sample_staggered` samples along them, so both read one definition.
    """
    u = torch.linspace(0.0, 1.0, n_frames, dtype=torch.float64)
    tau, delta = tau.double()[:, None], delta.double()[:, None]
    last = len(table) - 1
    p = (tau * (1 + delta) - delta * u).clamp(0.0, 1.0) * last  # [B, F] in table steps
    i = p.floor().long().clamp(max=last - 1)
    frac = p - i
    t = table.double()
    return (t[i] * (1 - frac) + t[i + 1] * frac).float()


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


def staggered_table(steps: int, delta: float, n_tokens: int = 4096) -> torch.Tensor:
    """The σ table of a staggered sampler with the joint sampler's cost: each frame crosses
    `ltx2_sigmas(round(steps / (1 + Δ)))`, which `euler_sample_staggered` walks in ≈ `steps`
    global steps (forwards)."""
    return ltx2_sigmas(max(1, round(steps / (1 + delta))), n_tokens)


def euler_sample_staggered(
    velocity: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    noise_v: torch.Tensor,
    noise_a: torch.Tensor,
    table: torch.Tensor,
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler along `staggered_sigmas`: round(steps (1 + Δ)) global steps, each moving every frame
    from its σ at τ_k to its σ at τ_k+1 (frames not started or finished do not move), so each
    frame still crosses the table in about `steps` steps. `velocity(x_v, x_a, σ_v [B,Fv],
    σ_a [B,Fa])` takes per-frame σ. Δ = 0 is `euler_sample` on `table`."""
    b, fv, fa = noise_v.shape[0], noise_v.shape[1], noise_a.shape[1]
    n = max(1, round((len(table) - 1) * (1 + delta)))
    d = torch.full((b,), float(delta))
    tau = [torch.full((b,), k / n) for k in range(n + 1)]  # global times
    # Every step's per-frame σ once: [n + 1, B, F] (step k runs from row k to row k + 1).
    sv = torch.stack([staggered_sigmas(table, t, d, fv) for t in tau]).to(noise_v.device)
    sa = torch.stack([staggered_sigmas(table, t, d, fa) for t in tau]).to(noise_a.device)
    xv, xa = noise_v, noise_a
    for k in range(n):
        vv, va = velocity(xv, xa, sv[k], sa[k])
        xv = xv + _b(sv[k + 1] - sv[k], xv) * vv.to(xv.dtype)
        xa = xa + _b(sa[k + 1] - sa[k], xa) * va.to(xa.dtype)
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
