"""Schedules against diffusers (betas, alphas_cumprod, Karras sigmas, log-sigma interpolation) and exact identities."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion.schedules import (
    CosineSchedule,
    KarrasSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
    ShiftedCosineSchedule,
    SigmoidSchedule,
    betas_sigmoid,
    sigmas_karras,
    vp_from_logsnr,
    vp_from_sigma,
)

DISCRETE = {
    "linear": (LinearSchedule, {"beta_start": 1e-4, "beta_end": 0.02}),
    "scaled_linear": (ScaledLinearSchedule, {"beta_start": 0.00085, "beta_end": 0.012}),
    "squaredcos_cap_v2": (CosineSchedule, {}),
    "sigmoid": (SigmoidSchedule, {"beta_start": 1e-4, "beta_end": 0.02}),
}


def _pair(name, zero_terminal_snr):
    cls, kwargs = DISCRETE[name]
    reference = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=name, rescale_betas_zero_snr=zero_terminal_snr, **kwargs
    )
    return cls(num_timesteps=1000, zero_terminal_snr=zero_terminal_snr, **kwargs), reference


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_matches_diffusers(name, zero_terminal_snr):
    ours, reference = _pair(name, zero_terminal_snr)
    assert ours.betas.shape == ours.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod.double(), atol=1e-6, rtol=0)
    if zero_terminal_snr:
        # diffusers rescales in float32, which cancels near the end (beta_998 ~ 0.5 is off by ~1e-5 there); the
        # same function run in float64 agrees with ours to rounding
        torch.testing.assert_close(ours.betas, reference.betas.double(), atol=2e-5, rtol=0)
        unscaled, _ = _pair(name, False)
        torch.testing.assert_close(ours.betas, diffusers_rescale(unscaled.betas), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(ours.betas, reference.betas.double(), atol=1e-6, rtol=0)


def test_sigmoid_betas_match_geodiff_formula():
    # the formula of GeoDiff's get_beta_schedule("sigmoid"), written independently in numpy
    ramp = np.linspace(-6, 6, 1000)
    expected = 1 / (np.exp(-ramp) + 1) * (2e-3 - 1e-7) + 1e-7
    np.testing.assert_allclose(betas_sigmoid(1000, 1e-7, 2e-3).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_tables_are_monotone_and_derived_once(name, zero_terminal_snr):
    s, _ = _pair(name, zero_terminal_snr)
    ac = s.alphas_cumprod
    assert (s.log_snrs.diff() < 0).all() and (s.sigmas.diff() > 0).all()
    finite = slice(0, -1) if zero_terminal_snr else slice(None)
    torch.testing.assert_close(s.snrs[finite], (ac / (1 - ac))[finite], rtol=1e-10, atol=0)
    torch.testing.assert_close(s.sigmas[finite], ((1 - ac) / ac).sqrt()[finite], rtol=1e-10, atol=0)
    alpha, sigma = s.alpha_sigma(torch.arange(1000))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000))
    torch.testing.assert_close(alpha.double(), ac.sqrt(), rtol=1e-6, atol=1e-7)
    if zero_terminal_snr:
        assert s.alphas_cumprod[-1] == 0 and s.snrs[-1] == 0
        assert s.log_snrs[-1] == -math.inf and s.sigmas[-1] == math.inf
        assert alpha[-1] == 0 and sigma[-1] == 1  # the VP form stays finite where the VE sigma is inf
        plain, _ = _pair(name, False)
        assert torch.isclose(s.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-12)  # first step kept
    else:
        assert s.log_snrs.isfinite().all()


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_sigma_t_round_trip(zero_terminal_snr):
    s = ScaledLinearSchedule(zero_terminal_snr=zero_terminal_snr)
    t = torch.arange(1000)
    assert torch.equal(s.t_from_logsnr(s.logsnr(t)), t.float())  # exact at the knots, including a -inf end
    assert torch.equal(s.sigma_to_t(s.t_to_sigma(t)).round(), t.float())
    # fractional t interpolates log-sigma linearly: half-way in t is the geometric mean in sigma
    t_half = torch.arange(0, 998).float() + 0.5
    sigma = s.t_to_sigma(t_half)
    torch.testing.assert_close(sigma, (s.sigmas[:-2] * s.sigmas[1:-1]).sqrt().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(s.sigma_to_t(sigma), t_half, rtol=0, atol=1e-3)
    # out of range: clamped to the ends
    ends = s.sigma_to_t(torch.tensor([0.0, 1e-9, math.inf]))
    assert ends.tolist() == [0.0, 0.0, 999.0]
    last = s.t_to_sigma(torch.tensor([999]))[0].item()
    assert last == math.inf if zero_terminal_snr else math.isclose(last, s.sigmas[-1].item(), rel_tol=1e-6)


def test_sigma_to_t_matches_diffusers_interpolation():
    s = ScaledLinearSchedule()
    reference = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sigma = torch.exp(torch.empty(500).uniform_(s.sigmas[0].log().item(), s.sigmas[-1].log().item()))
    expected = reference._sigma_to_t(sigma.double().numpy(), s.sigmas.log().numpy())
    np.testing.assert_allclose(s.sigma_to_t(sigma).numpy(), expected, atol=2e-3)


def test_get_sigmas_of_a_discrete_schedule():
    s = LinearSchedule()
    sigmas = s.get_sigmas(1000)
    assert sigmas.shape == (1001,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[:-1], s.sigmas.flip(0).float())


def test_sigmas_karras_matches_diffusers():
    reference = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    reference.set_timesteps(25)
    # diffusers' own training sigmas, from its float32 alphas_cumprod
    train_sigmas = ((1 - reference.alphas_cumprod) / reference.alphas_cumprod) ** 0.5
    sigmas = sigmas_karras(25, train_sigmas[0].item(), train_sigmas[-1].item())
    assert sigmas.shape == (26,) and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    torch.testing.assert_close(sigmas, reference.sigmas.float(), rtol=1e-5, atol=0)


def test_karras_schedule():
    s = KarrasSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    torch.testing.assert_close(s.get_sigmas(10), sigmas_karras(10, 0.002, 80.0, 7.0))
    t = torch.linspace(0, 1, 50)
    torch.testing.assert_close(s.t_to_sigma(t[[0, -1]]), torch.tensor([0.002, 80.0]))
    torch.testing.assert_close(
        s.t_to_sigma(t), sigmas_karras(50, 0.002, 80.0, 7.0)[:-1].flip(0), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-5)
    assert (s.logsnr(t).diff() < 0).all()


def test_shifted_cosine_schedule():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    unclipped = ShiftedCosineSchedule(
        resolution=64, base_resolution=64, logsnr_min=-math.inf, logsnr_max=math.inf
    )
    # VP cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2)
    alpha, sigma = unclipped.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.cos(math.pi * t / 2))
    torch.testing.assert_close(sigma, torch.sin(math.pi * t / 2))
    shifted = ShiftedCosineSchedule(
        resolution=256, base_resolution=64, logsnr_min=-math.inf, logsnr_max=math.inf
    )
    torch.testing.assert_close(shifted.logsnr(t), unclipped.logsnr(t) + 2 * math.log(64 / 256))
    # clipped to [-15, 15] before the shift, as in the paper's logsnr_schedule_cosine
    clipped = ShiftedCosineSchedule(resolution=512, base_resolution=64)
    ends = clipped.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        ends, torch.tensor([15.0, -15.0], dtype=torch.float64) + 2 * math.log(64 / 512)
    )
    assert (clipped.logsnr(t).diff() < 0).all()
    torch.testing.assert_close(clipped.t_from_logsnr(clipped.logsnr(t)), t)


def test_vp_from_logsnr_is_exact_at_the_ends():
    alpha, sigma = vp_from_logsnr(torch.tensor([-math.inf, 0.0, math.inf], dtype=torch.float64))
    assert alpha.tolist() == [0.0, math.sqrt(0.5), 1.0] and sigma.tolist() == [1.0, math.sqrt(0.5), 0.0]
    alpha, sigma = vp_from_sigma(torch.tensor([0.0, math.inf]))
    assert alpha.tolist() == [1.0, 0.0] and sigma.tolist() == [0.0, 1.0]
