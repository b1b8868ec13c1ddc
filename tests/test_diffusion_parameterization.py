"""Parameterizations: Table 1 coefficients, VE/VP agreement, targets, exact eps/x0/v round trips, diffusers parity."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.parameterization import (
    Denoiser,
    EDMPrecond,
    EpsPrediction,
    VPrediction,
    X0Prediction,
    append_dims,
    denoise,
    eps_from_v,
    eps_from_x0,
    v_from_eps,
    v_from_x0,
    x0_from_eps,
    x0_from_v,
)
from ldm.diffusion.schedules import ScaledLinearSchedule, logsnr_from_sigma, vp_from_sigma

PARAMETERIZATIONS = {
    "eps": EpsPrediction(),
    "v": VPrediction(),
    "x0": X0Prediction(),
    "edm": EDMPrecond(sigma_data=0.5),
}
SIGMAS = torch.logspace(math.log10(0.002), math.log10(80.0), 64, dtype=torch.float64)  # VE


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return x0, eps


def test_table_1_coefficients():
    s, sd = SIGMAS, 0.5
    expected = {
        "eps": (torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt()),
        "v": (1 / (s**2 + 1), -s / (s**2 + 1).sqrt(), 1 / (s**2 + 1).sqrt()),
        "x0": (torch.zeros_like(s), torch.ones_like(s), 1 / (s**2 + 1).sqrt()),
        "edm": (sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()),
    }
    for name, p in PARAMETERIZATIONS.items():
        c_skip, c_out, c_in, c_noise = p(s)
        for got, want in zip((c_skip, c_out, c_in), expected[name]):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(c_noise, 0.25 * s.log())  # EDM's c_noise when no schedule is given


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_vp_form_is_the_ve_form_rescaled(name):
    p = PARAMETERIZATIONS[name]
    alpha, sigma = vp_from_sigma(SIGMAS)
    c_skip, c_out, c_in = p.scalings(SIGMAS)
    c_skip_vp, c_out_vp, c_in_vp = p.scalings_vp(alpha, sigma)
    torch.testing.assert_close(c_skip_vp * alpha, c_skip)  # x_vp = alpha x_ve
    torch.testing.assert_close(c_in_vp * alpha, c_in)
    torch.testing.assert_close(c_out_vp, c_out)
    torch.testing.assert_close(p.log_c_out_squared(logsnr_from_sigma(SIGMAS)), (c_out**2).log())


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_target_is_what_makes_the_denoiser_exact(name):
    p = PARAMETERIZATIONS[name]
    x0, eps = _data()
    sigma_ve = append_dims(SIGMAS, 4)
    alpha, sigma = vp_from_sigma(sigma_ve)
    # VP form
    x = alpha * x0 + sigma * eps
    c_skip, c_out, _ = p.scalings_vp(alpha, sigma)
    torch.testing.assert_close(c_skip * x + c_out * p.target(x0, eps, alpha, sigma), x0)

    # VE form through denoise(): a network that outputs the target gives D(x, sigma) = x0
    def oracle(x_in, c_noise, context):
        assert context == "ctx"
        return p.target(x0, eps, alpha, sigma)

    torch.testing.assert_close(denoise(oracle, p, x0 + sigma_ve * eps, SIGMAS, "ctx"), x0)
    torch.testing.assert_close(Denoiser(oracle, p)(x0 + sigma_ve * eps, SIGMAS, "ctx"), x0)


def test_targets_are_finite_at_both_ends():
    x0, eps = _data(2)
    for alpha, sigma in [(0.0, 1.0), (1.0, 0.0)]:  # SNR = 0, SNR = inf
        alpha, sigma = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
        for p in PARAMETERIZATIONS.values():
            assert p.target(x0, eps, alpha, sigma).isfinite().all()
    # at SNR = 0: v = -x0, and the VP denoisers of v / x0 / EDM stay exact
    alpha, sigma = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(VPrediction().target(x0, eps, alpha, sigma), -x0)
    for name in ["v", "x0", "edm"]:
        p = PARAMETERIZATIONS[name]
        c_skip, c_out, c_in = p.scalings_vp(alpha, sigma)
        assert c_in.isfinite() and c_skip.isfinite() and c_out.isfinite()
        torch.testing.assert_close(c_skip * eps + c_out * p.target(x0, eps, alpha, sigma), x0)


def test_conversions_round_trip():
    x0, eps = _data()
    alpha, sigma = vp_from_sigma(append_dims(SIGMAS, 4))
    x = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    close = torch.testing.assert_close
    close(x0_from_eps(x, eps, alpha, sigma), x0)
    close(eps_from_x0(x, x0, alpha, sigma), eps)
    close(x0_from_v(x, v, alpha, sigma), x0)
    close(eps_from_v(x, v, alpha, sigma), eps)
    close(v_from_eps(x, eps, alpha, sigma), v)
    close(v_from_x0(x, x0, alpha, sigma), v)
    # chains: eps -> v -> x0 -> eps, x0 -> v -> eps -> x0
    close(eps_from_x0(x, x0_from_v(x, v_from_eps(x, eps, alpha, sigma), alpha, sigma), alpha, sigma), eps)
    close(x0_from_eps(x, eps_from_v(x, v_from_x0(x, x0, alpha, sigma), alpha, sigma), alpha, sigma), x0)


def test_conversions_at_the_ends():
    x0, eps = _data(4)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    # SNR = 0 (zero terminal SNR, VE sigma = inf): x = eps, v = -x0; v determines x0, eps determines nothing about x0
    x, v = eps, -x0
    torch.testing.assert_close(x0_from_v(x, v, zero, one), x0)
    torch.testing.assert_close(eps_from_v(x, v, zero, one), eps)
    torch.testing.assert_close(v_from_x0(x, x0, zero, one), v)
    torch.testing.assert_close(eps_from_x0(x, x0, zero, one), eps)
    # SNR = inf (sigma = 0): x = x0, v = eps
    x, v = x0, eps
    torch.testing.assert_close(x0_from_v(x, v, one, zero), x0)
    torch.testing.assert_close(eps_from_v(x, v, one, zero), eps)
    torch.testing.assert_close(v_from_eps(x, eps, one, zero), v)
    torch.testing.assert_close(x0_from_eps(x, eps, one, zero), x0)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_targets_match_diffusers_add_noise_and_get_velocity(zero_terminal_snr):
    reference = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    schedule = ScaledLinearSchedule(zero_terminal_snr=zero_terminal_snr)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, 4, 16, 16, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999, 999, 3])
    alpha, sigma = (append_dims(c, 4) for c in schedule.alpha_sigma(t))
    x = alpha * x0 + sigma * eps
    # diffusers' alphas_cumprod is float32 (ours float64): ~1e-6 apart near the end of a rescaled schedule
    torch.testing.assert_close(x, reference.add_noise(x0, eps, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        VPrediction().target(x0, eps, alpha, sigma), reference.get_velocity(x0, eps, t), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(EpsPrediction().target(x0, eps, alpha, sigma), eps)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_c_noise_is_the_exact_timestep_for_ddpm_models(zero_terminal_snr):
    schedule = ScaledLinearSchedule(zero_terminal_snr=zero_terminal_snr)
    t = torch.arange(1000)
    for p in [EpsPrediction(schedule=schedule), VPrediction(schedule=schedule)]:
        assert torch.equal(p.c_noise(schedule.logsnr(t)), t.float())  # exact, also at SNR = 0
        c_noise = p(schedule.t_to_sigma(t))[3]  # through the VE sigma the samplers use
        torch.testing.assert_close(c_noise, t.float(), rtol=0, atol=1e-2)
