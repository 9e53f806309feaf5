"""Flow-matching maths shared by training and serving."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import flow


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_noise_velocity_x0_round_trip(sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    s = torch.full((2, 3), sigma)
    xt = flow.add_noise(x0, eps, s)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(xt, v, s), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow.velocity_from_x0(xt, x0, s), v, rtol=1e-4, atol=1e-4)


def test_ltx2_sigmas_shape_and_terminal():
    s = flow.ltx2_sigmas(40, n_tokens=4096)
    assert s.shape == (41,) and s[0] == 1.0 and s[-1] == 0.0
    assert torch.all(s[1:] < s[:-1])
    assert abs(s[-2].item() - 0.1) < 1e-6  # stretched so the last non-zero σ is the terminal
    assert flow.ltx2_sigmas(1).tolist() == [1.0, 0.0]  # one step: nothing to stretch, no NaN


def test_guidance_convention():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert flow.guided(c, u, 3.0).item() == 4.0  # c + (s-1)(c-u)
    assert flow.guided(c, u, 1.0).item() == 2.0


def test_euler_on_a_linear_field_is_exact():
    # v = eps - x0 with known x0: Euler recovers x0 exactly from any σ grid.
    x0 = torch.tensor([[0.3, -0.7]])
    eps = torch.tensor([[1.0, 2.0]])
    out, _ = flow.euler_sample(
        lambda xv, xa, s: (eps - x0, xa * 0),
        eps.clone(),
        torch.zeros(1),
        torch.tensor([1.0, 0.5, 0.0]),
    )
    torch.testing.assert_close(out, x0)


def test_few_step_exit_and_determinism():
    calls = []

    def predict(xv, xa, s):
        calls.append((s, torch.is_grad_enabled()))
        return xv * 0 + 1.0, xa * 0 - 1.0

    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = flow.few_step(predict, torch.zeros(2), torch.zeros(2), [1.0, 0.75, 0.5], g1, stop_at=1)
    assert [c[0] for c in calls] == [1.0, 0.75]
    assert calls[0][1] is False and calls[1][1] is True  # only the exit step keeps gradients
    b = flow.few_step(predict, torch.zeros(2), torch.zeros(2), [1.0, 0.75, 0.5], g2, stop_at=1)
    torch.testing.assert_close(a, b)


def test_dmd_timestep_lookup_is_monotone():
    t = torch.arange(20, 981)
    s = flow.sigma_from_timestep(t)
    assert torch.all(s[1:] > s[:-1]) and 0 < s[0] < s[-1] < 1


def test_staggered_sigmas_earlier_frames_cleaner():
    table = flow.ltx2_sigmas(40, n_tokens=500)
    tau = torch.tensor([0.0, 0.3, 0.6, 1.0])
    flat = flow.staggered_sigmas(table, tau, torch.zeros(4), 6)
    # Δ = 0: every frame at the joint schedule's σ(τ) (table steps 0, 12, 24, 40)
    torch.testing.assert_close(flat, table[[0, 12, 24, 40]][:, None].expand(4, 6))
    s = flow.staggered_sigmas(table, tau, torch.full((4,), 2.0), 16)
    assert torch.all(s[:, 1:] >= s[:, :-1])  # later frames noisier
    assert torch.all(s[0] == 1.0) and torch.all(s[-1] == 0.0)  # start all noise, end all clean
    assert s[1, 0] < s[1, -1] and s[1, -1] == 1.0  # mid-run: the last frame not yet started


def test_staggered_euler_is_exact_on_a_linear_field_and_plain_at_zero():
    x0v, x0a = torch.randn(1, 5, 2, 2, 3), torch.randn(1, 9, 4)
    ev, ea = torch.randn(1, 5, 2, 2, 3), torch.randn(1, 9, 4)
    table = flow.ltx2_sigmas(8, n_tokens=100)
    for delta in (0.0, 1.5):  # every frame crosses σ 1 → 0, whatever its path
        v, a = flow.euler_sample_staggered(
            lambda xv, xa, sv, sa: (ev - x0v, ea - x0a), ev.clone(), ea.clone(), table, delta
        )
        torch.testing.assert_close(v, x0v), torch.testing.assert_close(a, x0a)

    # A state-dependent field: Δ = 0 takes the same steps as the joint Euler sampler.
    def field(xv, xa, sv, sa):
        return xv * sv[..., None, None, None], xa.sin()

    plain = flow.euler_sample(
        lambda xv, xa, s: field(xv, xa, torch.full(xv.shape[:2], s), None), ev, ea, table
    )
    stag = flow.euler_sample_staggered(field, ev, ea, table, 0.0)
    torch.testing.assert_close(stag[0], plain[0]), torch.testing.assert_close(stag[1], plain[1])


def test_staggered_table_keeps_the_joint_samplers_cost():
    calls = []

    def count(xv, xa, sv, sa):
        calls.append(1)
        return xv, xa

    for steps, delta in ((40, 2.0), (40, 1.0), (16, 0.0), (4, 3.0)):
        table = flow.staggered_table(steps, delta, n_tokens=300)
        calls.clear()
        flow.euler_sample_staggered(count, torch.zeros(1, 3, 1), torch.zeros(1, 5, 1), table, delta)
        # round(steps / (1 + Δ)) table steps, walked in (1 + Δ) times as many global steps
        assert abs(len(calls) - steps) <= (1 + delta) / 2 + 1e-9, (steps, delta, len(calls))
        assert table[0] == 1.0 and table[-1] == 0.0
