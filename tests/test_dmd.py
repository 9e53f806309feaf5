"""Pure distillation losses: the DMD gradient on hand-built tensors, the critic's masked
flow-matching loss (and that a critic step on fixed samples lowers it), σ sampling."""

from __future__ import annotations

import pytest
import torch

from model import AVDiT, flow, preset
from pipeline.distill import dmd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dmd_gradient_equals_normalised_score_difference() -> None:
    x_hat = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-0.5, 1.5, 1.5, -0.5]], requires_grad=True)
    real = torch.tensor([[0.0, 2.0, 1.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    fake = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    loss, g = dmd.dmd_loss(x_hat, real, fake)
    loss.backward()
    # Hand computation: per-sample mean |x̂ − real| = 0.75 and 1.0.
    want = torch.stack([(fake[0] - real[0]) / 0.75, (fake[1] - real[1]) / 1.0])
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_hat.grad * x_hat.numel(), want, rtol=1e-5, atol=1e-6)


def test_dmd_gradient_is_finite_when_degenerate() -> None:
    x = torch.zeros(2, 3, 5)
    fake = x.clone()
    fake[0, 0, 0] = float("nan")
    g = dmd.dmd_gradient(x, x, fake)  # zero residual and a NaN fake prediction
    assert torch.isfinite(g).all()
    assert g[1].abs().sum() == 0


def test_critic_loss_ignores_clean_frames() -> None:
    g = torch.Generator().manual_seed(0)
    x_hat, noise = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    sigma = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.7, 0.7]])
    x_t = flow.add_noise(x_hat, noise, sigma)
    pred = torch.randn(2, 4, 3, generator=g)
    base = dmd.critic_loss(pred, x_t, noise, x_hat, sigma)
    moved = pred.clone()
    moved[:, :2] += 100.0  # σ = 0 frames: not supervised
    assert torch.allclose(dmd.critic_loss(moved, x_t, noise, x_hat, sigma), base)
    moved[:, 2:] += 1.0
    assert not torch.allclose(dmd.critic_loss(moved, x_t, noise, x_hat, sigma), base)
    # The exact x0 gives zero loss (flow = ε − x̂).
    assert dmd.critic_loss(x_hat, x_t, noise, x_hat, sigma) < 1e-10


def test_critic_step_lowers_its_loss_on_fixed_samples() -> None:
    torch.manual_seed(0)
    critic = AVDiT(preset("tiny"))  # bidirectional
    g = torch.Generator().manual_seed(1)
    xv, xa = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 26, 16, generator=g)
    nv, na = torch.randn(xv.shape, generator=g), torch.randn(xa.shape, generator=g)
    sig = dmd.sample_sigma(2, g, n_tokens=4 * 4 + 26)
    sv, sa = sig[:, None].expand(-1, 4), sig[:, None].expand(-1, 26)
    xtv, xta = flow.add_noise(xv, nv, sv), flow.add_noise(xa, na, sa)
    emb, mask = torch.randn(2, 3, 32, generator=g), torch.ones(2, 3, dtype=torch.bool)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        vv, va = critic(xtv, xta, sv, sa, emb, mask)
        x0v, x0a = flow.x0_from_velocity(xtv, vv, sv), flow.x0_from_velocity(xta, va, sa)
        return dmd.critic_loss(x0v, xtv, nv, xv, sv) + dmd.critic_loss(x0a, xta, na, xa, sa)

    first = loss()
    for _ in range(6):
        opt.zero_grad()
        cur = loss()
        cur.backward()
        opt.step()
    assert loss().item() < 0.8 * first.item()


def test_sample_sigma_range_and_seed() -> None:
    a = dmd.sample_sigma(64, torch.Generator().manual_seed(3), 4096)
    b = dmd.sample_sigma(64, torch.Generator().manual_seed(3), 4096)
    assert torch.equal(a, b)
    lo = flow.sigma_from_timestep(torch.tensor([20]), 4096)
    hi = flow.sigma_from_timestep(torch.tensor([980]), 4096)
    assert (a >= lo - 1e-7).all() and (a <= hi + 1e-7).all()


def test_ode_loss_masks_clean_frames() -> None:
    pred, target = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    sigma = torch.tensor([[0.0, 0.5, 1.0]])
    assert dmd.ode_loss(pred, target, sigma).item() == 1.0
    pred[:, 0] = 50.0  # the σ = 0 frame is clean input: never supervised
    assert dmd.ode_loss(pred, target, sigma).item() == 1.0
    assert dmd.ode_loss(pred, target, torch.zeros(1, 3)).item() == 0.0
