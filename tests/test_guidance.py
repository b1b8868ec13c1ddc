"""Guidance rules against closed forms on Gaussians and against diffusers' guiders.

Oracle: for cond / uncond data N(mu_c, s^2 I) / N(mu_u, s^2 I) the denoisers are exact, D(x, sigma) = mu + s^2 /
(s^2 + sigma^2) (x - mu), and when the guided prediction is D_c + (w - 1) g(sigma) with g independent of x, the
probability-flow ODE dx/dsigma = (x - D) / sigma is linear: with y = x - mu_c and r(sigma) = sqrt(s^2 + sigma^2),
    y(0) = s y(sigma_max) / r(sigma_max) + (w - 1) s int_0^sigma_max g(sigma) / (sigma r(sigma)) dsigma,
exactly, trajectory by trajectory. CFG has g = sigma^2 / r^2 (mu_c - mu_u), whose integral is (mu_c - mu_u)
(1 / r(lo) - 1 / r(hi)) over a guidance interval (lo, hi]; APG in one dimension has g = eta clip(g_cfg), integrated
by quadrature."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import ClassifierFreeZeroStarGuidance
from scipy.integrate import quad

from ldm.diffusion.guidance import GUIDANCE_METHODS, apg, cfg_denoiser, cfg_zero_star
from ldm.diffusion.samplers import sample_euler
from ldm.diffusion.schedules import sigmas_karras

S, SIGMA_MAX = 0.5, 80.0


def gaussian_pair(mu_c: torch.Tensor, mu_u: torch.Tensor):
    """D(x, sigma, cond) for conditioning 1 (data N(mu_c, S^2 I)) and 0 (N(mu_u, S^2 I)), exact."""
    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mu = torch.where(cond.reshape(-1, *[1] * (x.ndim - 1)) > 0, mu_c, mu_u)
        gain = (S**2 / (S**2 + sigma**2)).reshape(-1, *[1] * (x.ndim - 1))
        return mu + gain * (x - mu)
    return denoiser


def r(sigma: float) -> float:
    return math.sqrt(S**2 + sigma**2)


def run_ode(denoiser, x: torch.Tensor, breaks=(), steps: int = 300) -> torch.Tensor:
    """Euler on a Karras ladder holding the interval ends `breaks` (Euler evaluates each step at its start, so no step
    mixes both sides of a switch), Richardson-extrapolated with the ladder of midpoints: O(h^2), ~1e-4 here."""
    sigmas = sigmas_karras(steps, 0.002, SIGMA_MAX).double()
    points = torch.tensor([b for b in breaks if 0 < b < SIGMA_MAX], dtype=torch.float64)
    sigmas = torch.cat([sigmas, points]).sort(descending=True).values
    mid = (sigmas[:-1] * sigmas[1:]).sqrt()
    mid[-1] = sigmas[-2] / 2  # the step to 0
    fine = torch.cat([torch.stack([sigmas[:-1], mid], 1).flatten(), sigmas[-1:]])
    return 2 * sample_euler(denoiser, x, fine) - sample_euler(denoiser, x, sigmas)


def start(dim: int, batch: int = 64) -> torch.Tensor:
    return SIGMA_MAX * torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("interval", [None, (0.3, 5.0), (1.0, math.inf), (0.0, 0.8)])
def test_cfg_with_interval_matches_the_closed_form(w: float, interval) -> None:
    mu_c, mu_u = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64), torch.tensor([-0.3, 0.4, 0.2],
                                                                                    dtype=torch.float64)
    x = start(3)
    guided = cfg_denoiser(gaussian_pair(mu_c, mu_u), torch.ones(1), torch.zeros(1), w, interval=interval)
    lo, hi = interval or (0.0, math.inf)
    shift = (w - 1) * S * (mu_c - mu_u) * (1 / r(lo) - 1 / r(min(hi, SIGMA_MAX)))
    exact = mu_c + S * (x - mu_c) / r(SIGMA_MAX) + shift
    torch.testing.assert_close(run_ode(guided, x, interval or ()), exact, rtol=0, atol=3e-4)
    if w != 1 and interval is not None:  # the interval matters: guidance everywhere lands elsewhere
        everywhere = mu_c + S * (x - mu_c) / r(SIGMA_MAX) + (w - 1) * S * (mu_c - mu_u) * (1 / S - 1 / r(SIGMA_MAX))
        assert (exact - everywhere).abs().max() > 0.05


def test_interval_saves_the_unconditional_half() -> None:
    calls = []
    model = gaussian_pair(torch.ones(2), torch.zeros(2))
    guided = cfg_denoiser(lambda x, s, c: calls.append(x.shape[0]) or model(x, s, c), torch.ones(1), torch.zeros(1),
                          5.0, interval=(0.5, 2.0))
    x = torch.randn(3, 2)
    outside, inside = guided(x, torch.full((3,), 4.0)), guided(x, torch.full((3,), 1.0))
    assert calls == [3, 6]  # outside: one half-size (conditional) forward; inside: cond and uncond in one
    torch.testing.assert_close(outside, model(x, torch.full((3,), 4.0), torch.ones(3)))
    mixed = guided(x, torch.tensor([4.0, 1.0, 0.2]))  # per sample: only the middle one is guided
    torch.testing.assert_close(mixed[1], inside[1]) and torch.testing.assert_close(mixed[0], outside[0])
    assert not torch.allclose(mixed[1], outside[1])


@pytest.mark.parametrize("eta,threshold", [(1.0, 0.0), (0.5, 0.0), (1.0, 0.3), (0.25, 0.5)])
def test_apg_in_one_dimension_matches_the_closed_form(eta: float, threshold: float) -> None:
    """In 1-D the difference is parallel to D_c, so APG is D_c + (w - 1) eta clip(D_c - D_u): g depends on sigma only."""
    w, delta = 4.0, 1.2
    mu_c, mu_u = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.7 - delta], dtype=torch.float64)
    x = start(1)
    guided = cfg_denoiser(gaussian_pair(mu_c, mu_u), torch.ones(1), torch.zeros(1), w, method="apg", eta=eta,
                          norm_threshold=threshold)

    def g(sigma: float) -> float:
        diff = delta * sigma**2 / r(sigma) ** 2
        return eta * (min(diff, threshold) if threshold > 0 else diff)

    integral = quad(lambda s: g(s) / (s * r(s)), 0, SIGMA_MAX, limit=200, points=[0.1, 1.0])[0]
    exact = mu_c + S * (x - mu_c) / r(SIGMA_MAX) + (w - 1) * S * integral
    torch.testing.assert_close(run_ode(guided, x), exact, rtol=0, atol=3e-4)


def test_apg_removes_the_parallel_part() -> None:
    """eta = 0: the update is orthogonal to D_c, per sample; eta = 1 without momentum or clip is CFG."""
    g = torch.Generator().manual_seed(1)
    d_cond, d_uncond, x = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    sigma = torch.ones(3)
    update = apg(5.0, eta=0.0)(d_cond, d_uncond, x, sigma) - d_cond
    assert (update * d_cond).flatten(1).sum(1).abs().max() < 1e-4
    torch.testing.assert_close(apg(5.0, eta=1.0)(d_cond, d_uncond, x, sigma), d_uncond + 5.0 * (d_cond - d_uncond))


@pytest.mark.parametrize("momentum,threshold,eta", [(0.0, 0.0, 0.0), (-0.75, 2.5, 0.0), (0.5, 1.0, 0.3)])
def test_apg_matches_diffusers(momentum: float, threshold: float, eta: float) -> None:
    """diffusers' `normalized_guidance` with use_original_formulation (D_c + scale u) is the paper's D_c + (w - 1) u."""
    w, gen = 6.0, torch.Generator().manual_seed(2)
    ours = apg(w, eta=eta, norm_threshold=threshold, momentum=momentum)
    buffer = MomentumBuffer(momentum) if momentum else None
    for _ in range(4):  # several steps: the momentum state
        d_cond, d_uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        want = normalized_guidance(d_cond, d_uncond, w - 1, buffer, eta, threshold, use_original_formulation=True)
        torch.testing.assert_close(ours(d_cond, d_uncond, None, None), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_init", [0, 1, 2])
def test_cfg_zero_star_matches_diffusers_on_the_velocity(zero_init: int) -> None:
    """On a flow model's velocity v = eps - x0 (x = x0 + sigma eps), step by step, zero init included."""
    w, gen = 4.0, torch.Generator().manual_seed(3)
    ours = cfg_zero_star(w, zero_init_steps=zero_init)
    theirs = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_init)
    for step, sigma in enumerate([30.0, 5.0, 1.0, 0.2]):
        x = torch.randn(2, 4, 8, 8, generator=gen) * math.sqrt(1 + sigma**2)
        d_cond, d_uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        s = torch.full((2,), sigma)
        v_cond, v_uncond = ((x - (1 + sigma) * d) / sigma for d in (d_cond, d_uncond))
        theirs.set_state(step, 4, None)
        v = theirs.forward(v_cond, v_uncond).pred
        torch.testing.assert_close(ours(d_cond, d_uncond, x, s), (x - sigma * v) / (1 + sigma), rtol=1e-5,
                                   atol=1e-5)


def test_cfg_zero_star_in_one_dimension_is_the_conditional() -> None:
    """1-D velocities are parallel, so the optimal scale s makes s v_u = v_c and the guided samples are exactly the
    conditional ones, N(mu_c, S^2), whatever w; CFG moves them by (w - 1) S (mu_c - mu_u) (1 / S - 1 / r)."""
    # v_u = 0 would leave s v_u != v_c for a step (the 1e-8 in |v_u|^2 + 1e-8, diffusers' too; a 1-D artefact, latents
    # have large |v_u|^2). v_u runs from n - mu_u (x = SIGMA_MAX n) to -x0: these means keep it above 0.4 for |n| <= 3.
    mu_c, mu_u = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)
    x = start(1).clamp(-3 * SIGMA_MAX, 3 * SIGMA_MAX)
    model = gaussian_pair(mu_c, mu_u)
    zero_star = cfg_denoiser(model, torch.ones(1), torch.zeros(1), 6.0, method="cfg_zero_star", zero_init_steps=0)
    conditional = mu_c + S * (x - mu_c) / r(SIGMA_MAX)
    torch.testing.assert_close(run_ode(zero_star, x), conditional, rtol=0, atol=3e-4)
    plain = cfg_denoiser(model, torch.ones(1), torch.zeros(1), 6.0)
    shift = 5.0 * S * (mu_c - mu_u) * (1 / S - 1 / r(SIGMA_MAX))  # 2 * 5 * (1 - 0.006)
    torch.testing.assert_close(run_ode(plain, x), conditional + shift, rtol=0, atol=3e-4)


def test_cfg_zero_star_zero_init_keeps_the_flow_state() -> None:
    """v = 0 on the first evaluation: an Euler step leaves the flow state x / (1 + sigma) where it was."""
    model = gaussian_pair(torch.ones(2), -torch.ones(2))
    guided = cfg_denoiser(model, torch.ones(1), torch.zeros(1), 4.0, method="cfg_zero_star", zero_init_steps=1)
    sigmas = torch.tensor([50.0, 10.0, 2.0, 0.0])
    states = []
    sample_euler(guided, 50.0 * torch.randn(4, 2), sigmas, callback=lambda i, x, *_: states.append(x.clone()))
    torch.testing.assert_close(states[1] / 11.0, states[0] / 51.0)
    assert not torch.allclose(states[2] / 3.0, states[1] / 11.0)


def test_unknown_method_or_option_is_a_clear_error() -> None:
    model = gaussian_pair(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown guidance method 'pag'; expected one of"):
        cfg_denoiser(model, torch.ones(1), torch.zeros(1), 5.0, method="pag")
    with pytest.raises(ValueError, match=r"guidance method 'apg' takes no option zero_init_steps; its options are "
                                         r"\['eta', 'norm_threshold', 'momentum'\]"):
        cfg_denoiser(model, torch.ones(1), torch.zeros(1), 5.0, method="apg", zero_init_steps=1)
    with pytest.raises(ValueError, match="guidance_interval must be"):
        cfg_denoiser(model, torch.ones(1), torch.zeros(1), 5.0, interval=(2.0, 1.0))
    assert set(GUIDANCE_METHODS) == {"cfg", "apg", "cfg_zero_star"}
