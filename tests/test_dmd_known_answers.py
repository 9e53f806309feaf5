"""The distillation losses on problems whose answers are known in closed form.

Data are Gaussians (and a two-component mixture), with the flow-matching path
x_t = (1 − σ)·x0 + σ·ε of `model.flow`, so every denoiser E[x0 | x_t] is exact:
for x0 ~ N(μ, s²) and α = 1 − σ, E[x0 | x_t] = μ + α s² / (α² s² + σ²) · (x_t − α μ).
A latent is [B, D] with D i.i.d. dimensions, so DMD's per-sample normaliser (a mean over D) is
nearly constant across samples, as it is for real latents with thousands of elements.

- the ODE-regression loss recovers the teacher's deterministic noise → sample map;
- DMD with the exact real score moves a generator's distribution onto the teacher's, with the
  fake score exact or a critic fitted by `dmd.critic_loss` (5 critic steps per generator step),
  and the KL falls at every check to ≈ 0;
- the DMD gradient points along the true ∇θ KL(p_fake,t ‖ p_real,t) (Tweedie: x0_fake − x0_real
  = σ²/α · (s_fake − s_real)), and flipping its sign makes the KL grow;
- the exact fake denoiser minimises the critic's loss, which a fitted critic reaches.
"""

from __future__ import annotations

import math

import pytest
import torch

from model import flow
from pipeline.distill import dmd

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 1.5, 0.5  # the teacher's data: N(MU, S²) per dimension


def gauss_x0(x_t: torch.Tensor, sigma: torch.Tensor, mu, s) -> torch.Tensor:
    """Exact E[x0 | x_t] for x0 ~ N(mu, s²); σ [B, 1] broadcasts over [B, D]."""
    a = 1 - sigma
    return mu + a * s**2 / (a**2 * s**2 + sigma**2) * (x_t - a * mu)


def kl_gauss(m1, s1, m2: float, s2: float) -> torch.Tensor:
    """KL(N(m1, s1²) ‖ N(m2, s2²)) of one dimension."""
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


class Generator(torch.nn.Module):
    """x̂ = b + a·z: a Gaussian generator N(b, a²) (a kept positive through exp)."""

    def __init__(self, b: float = -1.0, a: float = 2.0) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(b))
        self.log_a = torch.nn.Parameter(torch.tensor(math.log(a)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.b + self.log_a.exp() * z

    def kl(self) -> float:
        return float(kl_gauss(self.b.detach(), self.log_a.detach().exp(), MU, S))


class Critic(torch.nn.Module):
    """The fake denoiser's function class: E[x0 | x_t] of some N(m, c²) (fitted, not given)."""

    def __init__(self) -> None:
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor(0.0))
        self.log_c = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return gauss_x0(x_t, sigma, self.m, self.log_c.exp())


def _noised(x: torch.Tensor, g: torch.Generator):
    sigma = torch.empty(x.shape[0], 1).uniform_(0.05, 0.95, generator=g)
    noise = torch.randn(x.shape, generator=g)
    return flow.add_noise(x, noise, sigma), sigma, noise


def _dmd_step(gen, opt, real_x0, fake_x0, g, batch=64, dim=256, sign=1.0) -> None:
    x_hat = gen(torch.randn(batch, dim, generator=g))
    x_t, sigma, _ = _noised(x_hat.detach(), g)
    with torch.no_grad():
        real, fake = real_x0(x_t, sigma), fake_x0(x_t, sigma)
    loss, _ = dmd.dmd_loss(x_hat, real, fake) if sign > 0 else dmd.dmd_loss(x_hat, fake, real)
    opt.zero_grad()
    loss.backward()  # ∂loss/∂x̂ = g / numel: θ moves by the mean of g·∂x̂/∂θ
    opt.step()


def _critic_step(critic, opt, gen, g, batch=64, dim=256) -> float:
    with torch.no_grad():
        x_hat = gen(torch.randn(batch, dim, generator=g))
    x_t, sigma, noise = _noised(x_hat, g)
    loss = dmd.critic_loss(critic(x_t, sigma)[:, :, None], x_t[:, :, None], noise[:, :, None],
                           x_hat[:, :, None], sigma.expand(-1, dim))  # fmt: skip
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


def test_dmd_with_exact_scores_moves_the_generator_onto_the_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    gen = Generator()
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    real = lambda x_t, s: gauss_x0(x_t, s, MU, S)  # noqa: E731
    fake = lambda x_t, s: gauss_x0(x_t, s, gen.b.detach(), gen.log_a.exp().detach())  # noqa: E731
    kls = [gen.kl()]
    for step in range(1, 401):
        _dmd_step(gen, opt, real, fake, g)
        if step % 50 == 0:
            kls.append(gen.kl())
    assert kls[0] > 2.0
    assert all(b < a for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < 2e-3, kls
    assert abs(float(gen.b) - MU) < 0.05 and abs(float(gen.log_a.exp()) - S) < 0.05


def test_dmd_with_a_fitted_critic_reaches_the_teacher() -> None:
    """TTUR as the stage runs it: 5 critic updates (flow-matching loss) per generator update."""
    g = torch.Generator().manual_seed(1)
    gen, critic = Generator(), Critic()
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    copt = torch.optim.Adam(critic.parameters(), lr=0.05)
    real = lambda x_t, s: gauss_x0(x_t, s, MU, S)  # noqa: E731
    for _ in range(100):  # the critic starts fitted to the initial generator
        _critic_step(critic, copt, gen, g)
    kls = [gen.kl()]
    for step in range(1, 401):
        for _ in range(5):
            _critic_step(critic, copt, gen, g)
        _dmd_step(gen, opt, real, critic, g)
        if step % 50 == 0:
            kls.append(gen.kl())
    assert all(b < a for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < 1e-2, kls
    # The critic tracks the generator it was fitted to.
    assert abs(float(critic.m) - float(gen.b)) < 0.05
    assert abs(float(critic.log_c.exp()) - float(gen.log_a.exp())) < 0.05


def test_flipping_the_dmd_sign_makes_the_kl_grow() -> None:
    g = torch.Generator().manual_seed(2)
    gen = Generator(b=1.0, a=0.7)
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    real = lambda x_t, s: gauss_x0(x_t, s, MU, S)  # noqa: E731
    fake = lambda x_t, s: gauss_x0(x_t, s, gen.b.detach(), gen.log_a.exp().detach())  # noqa: E731
    before = gen.kl()
    for _ in range(100):
        _dmd_step(gen, opt, real, fake, g, sign=-1.0)
    assert gen.kl() > 2 * before


def test_dmd_gradient_is_the_kl_gradient_up_to_a_positive_scale() -> None:
    """At one σ, DMD's ∇θ (autograd through `dmd_loss`) ∥ the exact ∇θ KL(p_fake,σ ‖ p_real,σ),
    and its scale is the exact one (α²/σ² per element) divided by DMD's normaliser."""
    g = torch.Generator().manual_seed(3)
    gen = Generator(b=0.2, a=1.3)
    sigma, batch, dim = 0.6, 4096, 64
    alpha = 1 - sigma
    # Exact: the σ-marginals are N(α b, α² a² + σ²) and N(α μ, α² s² + σ²).
    sd = lambda a: torch.sqrt(alpha**2 * a**2 + sigma**2)  # noqa: E731
    exact = torch.autograd.grad(
        kl_gauss(alpha * gen.b, sd(gen.log_a.exp()), alpha * MU, float(sd(torch.tensor(S)))),
        list(gen.parameters()),
    )
    exact = torch.stack(exact)
    x_hat = gen(torch.randn(batch, dim, generator=g))
    x_t = flow.add_noise(x_hat.detach(), torch.randn(batch, dim, generator=g), sigma)
    s = torch.full((batch, 1), sigma)
    real = gauss_x0(x_t, s, MU, S)
    fake = gauss_x0(x_t, s, gen.b.detach(), gen.log_a.exp().detach())
    norm = float(dmd.per_sample_mean_abs(x_hat.detach() - real).mean())
    loss, _ = dmd.dmd_loss(x_hat, real, fake)
    got = torch.stack(torch.autograd.grad(loss * x_hat.numel() / batch, list(gen.parameters())))
    cos = float(torch.nn.functional.cosine_similarity(got, exact, dim=0))
    assert cos > 0.995, (got, exact)
    # Summed over the D dimensions: D·E[(x0_fake − x0_real)·∂x̂/∂θ] / norm against the exact
    # α²/σ² · E[(x0_fake − x0_real)·∂x̂/∂θ] of one dimension's KL: DMD's normaliser stands in
    # for the weight α²/σ².
    ratio = float(got.norm() / exact.norm())
    assert ratio == pytest.approx(dim * sigma**2 / (alpha**2 * norm), rel=0.05)


def test_the_exact_fake_denoiser_minimises_the_critic_loss() -> None:
    g = torch.Generator().manual_seed(4)
    gen = Generator(b=0.3, a=0.8)
    batch, dim = 512, 128
    with torch.no_grad():
        x_hat = gen(torch.randn(batch, dim, generator=g))
    x_t, sigma, noise = _noised(x_hat, g)

    def loss_of(m: float, c: float) -> float:
        x0 = gauss_x0(x_t, sigma, m, c)
        return float(dmd.critic_loss(x0[:, :, None], x_t[:, :, None], noise[:, :, None],
                                     x_hat[:, :, None], sigma.expand(-1, dim)))  # fmt: skip

    best = loss_of(0.3, 0.8)
    for m, c in [(0.5, 0.8), (0.1, 0.8), (0.3, 1.0), (0.3, 0.6), (MU, S)]:
        assert loss_of(m, c) > best, (m, c)
    # And a critic fitted with the same loss finds it.
    critic, copt = Critic(), None
    copt = torch.optim.Adam(critic.parameters(), lr=0.05)
    for _ in range(300):
        _critic_step(critic, copt, gen, g)
    assert abs(float(critic.m) - 0.3) < 0.05 and abs(float(critic.log_c.exp()) - 0.8) < 0.05


# ---- ODE regression: the student recovers the teacher's deterministic map ----------------------
MIX = (torch.tensor([-2.0, 2.0]), 0.4)  # 1-D mixture ½N(−2, 0.4²) + ½N(2, 0.4²)


def mixture_x0(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x_t] of the mixture: component posteriors times per-component denoisers."""
    mus, s = MIX
    a = (1 - sigma)[..., None]
    var = a**2 * s**2 + sigma[..., None] ** 2
    x = x_t[..., None]
    logw = -((x - a * mus) ** 2) / (2 * var)  # equal weights and variances
    w = torch.softmax(logw, dim=-1)
    return (w * (mus + a * s**2 / var * (x - a * mus))).sum(-1)


def teacher_trajectory(noise: torch.Tensor, at: list[float], steps: int = 200) -> torch.Tensor:
    """The teacher's ODE (exact velocity (x_t − x0)/σ), fine Euler from σ = 1 to 0; [len(at)+1, B]
    states at the σ values `at` (each on the grid) and the end."""
    grid = torch.linspace(1.0, 0.0, steps + 1)
    keep = {round(s * steps) for s in at}
    x, states = noise, []
    for i, (s, s_next) in enumerate(zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True)):
        if i in {steps - k for k in keep}:
            states.append(x)
        x = x + (s_next - s) * flow.velocity_from_x0(x, mixture_x0(x, torch.full_like(x, s)), s)
    return torch.stack(states + [x])


def test_ode_regression_recovers_the_teachers_map() -> None:
    """The ODE stage's loss on the teacher's trajectory states at the student's σ list gives a
    few-step student whose one-step map from noise is the teacher's many-step map."""
    g = torch.Generator().manual_seed(5)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    eps = torch.randn(8192, generator=g)
    traj = teacher_trajectory(eps, sigmas)  # [5, N]: states at σ_k, then the end x0
    with torch.random.fork_rng():  # the MLP's initialisation, seeded without touching global state
        torch.manual_seed(5)
        net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                  torch.nn.SiLU(), torch.nn.Linear(64, 1))  # fmt: skip
    student = lambda x, s: x + net(torch.stack([x, s], -1)).squeeze(-1)  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    iters = 3000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        i = torch.randint(0, eps.numel(), (256,), generator=g)
        k = torch.randint(0, len(sigmas), (256,), generator=g)
        s = torch.tensor(sigmas)[k]
        loss = dmd.ode_loss(student(traj[k, i], s)[:, None], traj[-1, i][:, None], s[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    test = torch.randn(2048, generator=g)
    with torch.no_grad():
        want = teacher_trajectory(test, [])[-1]
        got = student(test, torch.ones_like(test))  # one step from pure noise
        mid = teacher_trajectory(test, [0.5])
        got_mid = student(mid[0], torch.full_like(test, 0.5))  # from the teacher's own σ=0.5 state
    # The map is steep between the modes, so a few samples there carry most of the mean error.
    err, err_mid = (got - want).abs(), (got_mid - want).abs()
    assert float(err.median()) < 0.03 and float(err.mean()) < 0.06, (err.median(), err.mean())
    assert float(err_mid.median()) < 0.03 and float(err_mid.mean()) < 0.06
    # The map is the teacher's, not just its distribution: the same noise lands on the same mode.
    assert float(((got > 0) == (want > 0)).float().mean()) > 0.99
