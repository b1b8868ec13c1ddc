"""Samplers, spacings and guidance: parity with diffusers' schedulers on one analytic denoiser and one noise draw, the
Gaussian oracle D(x, sigma) = x s^2 / (s^2 + sigma^2), zero-terminal-SNR ladders with a v-prediction denoiser, CFG."""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.guiders.guider_utils import rescale_noise_cfg  # no transformers needed

from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.parameterization import Denoiser, VPrediction, append_dims
from ldm.diffusion.samplers import SAMPLERS, get_sampler
from ldm.diffusion.schedules import CosineSchedule, KarrasSchedule, ScaledLinearSchedule, sigmas_karras
from ldm.diffusion.spacing import (
    ZERO_SNR_SIGMA,
    discrete_sigmas,
    sampling_sigmas,
    sigmas_exponential,
    spaced_timesteps,
)

S = 0.5  # data std of the Gaussian oracle


pytestmark = pytest.mark.usefixtures("one_thread")


def analytic_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear D(x, sigma) so that second-order terms are exercised; computed in float64."""
    s = append_dims(sigma.to(torch.float64), x.ndim)
    x64 = x.to(torch.float64)
    return (x64 * S**2 / (S**2 + s**2) + 0.3 * torch.tanh(x64) / (1 + s)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers harness: the same D, seen through a scheduler's timesteps, scaled inputs and eps / v outputs.


def diffusers_model(scheduler, prediction_type: str):
    table = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt().numpy()  # VE sigmas

    def model(x_in: torch.Tensor, t: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        if sigma is None:
            sigma = float(np.interp(float(t), np.arange(len(table)), table))  # diffusers' own t -> sigma
        if math.isinf(sigma):  # alpha_bar = 0 exactly (DDIM / DDPM zero SNR): D -> 0, so v = -x0 = 0, eps = x
            return torch.zeros_like(x_in) if prediction_type == "v_prediction" else x_in
        x_in = x_in.double()
        x = x_in * math.sqrt(1 + sigma**2)  # both kinds of input are alpha * x_ve = x_vp
        x0 = analytic_denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))
        eps = (x - x0) / sigma
        alpha, sigma_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        out = eps if prediction_type == "epsilon" else alpha * eps - sigma_vp * x0
        return out.float()

    return model


def run_diffusers(scheduler, sigmas: torch.Tensor, noise: torch.Tensor, prediction_type: str, seed: int, *,
                  at_sigmas: bool = False, **step_kwargs) -> torch.Tensor:
    """diffusers' loop with the model at the table sigma of each timestep, or (at_sigmas) at scheduler.sigmas[i]: a
    ladder off the timestep grid (exponential, karras) has timesteps that only approximate its sigmas."""
    n = len(sigmas) - 1
    scheduler.set_timesteps(n)
    model = diffusers_model(scheduler, prediction_type)
    ve = isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler))
    sample = noise * sigmas[0]  # the x_ve our samplers start from; VP schedulers hold x_vp = alpha * x_ve
    if not ve:
        sample = sample / (1 + sigmas[0] ** 2).sqrt()
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # not Heun's or UniPC's
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
    for i, t in enumerate(scheduler.timesteps):
        out = model(scheduler.scale_model_input(sample, t), t, float(scheduler.sigmas[i]) if at_sigmas else None)
        sample = scheduler.step(out, t, sample, **kwargs, **step_kwargs).prev_sample
    return sample


SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
# sampler -> (diffusers scheduler factory, timestep spacing, steps_offset); each spacing is one diffusers defines the
# same way for that scheduler (DPM-Solver's "leading"/"linspace" use n + 1 points, DDIM/DDPM step to t - T // n).
CASES = {
    "euler": (EulerDiscreteScheduler, "linspace", 0),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, "leading", 1),
    "heun": (HeunDiscreteScheduler, "trailing", 0),
    "ddim": (lambda **kw: DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **kw), "leading", 1),
    "ddpm": (lambda **kw: DDPMScheduler(clip_sample=False, variance_type="fixed_small", **kw), "leading", 0),
    "dpmpp_2m": (lambda **kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw),
                 "trailing", 0),
    "dpmpp_3m": (lambda **kw: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3, **kw),
                 "trailing", 0),
    "dpmpp_2m_sde": (lambda **kw: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2, **kw),
                     "trailing", 0),
    "unipc": (lambda **kw: UniPCMultistepScheduler(solver_order=3, solver_type="bh2", predict_x0=True,
                                                   lower_order_final=True, final_sigmas_type="zero", **kw),
              "trailing", 0),
}


def parity_error(name: str, prediction_type: str, zero_snr: bool, n: int = 10, eta: float | None = None) -> float:
    factory, spacing, offset = CASES[name]
    if zero_snr:
        spacing, offset = "trailing", 0  # only trailing reaches the zero-SNR step
    scheduler = factory(**SD_BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                        **({"rescale_betas_zero_snr": True} if zero_snr else {}))
    schedule = ScaledLinearSchedule(zero_terminal_snr=zero_snr)
    sigmas = discrete_sigmas(schedule, n, spacing, steps_offset=offset)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eta_kwargs = {} if eta is None else {"eta": eta}
    theirs = run_diffusers(scheduler, sigmas, noise, prediction_type, seed=1, **eta_kwargs)
    ours = get_sampler(name)(analytic_denoiser, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(1),
                             **eta_kwargs)
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name: str, prediction_type: str) -> None:
    # same noise draws: both sides call torch.randn(shape, generator) once per noisy step, in the same order
    assert parity_error(name, prediction_type, zero_snr=False) < 1e-5  # measured 4e-7 .. 1.2e-6
    # unipc 7e-7; its predictor alone (= dpmpp_2m) or UniC-1 in place of UniC-2 would be off by ~1e-2


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_parity_with_diffusers_exponential(name: str, zero_snr: bool) -> None:
    """Our "exponential" ladder against use_exponential_sigmas, where the solvers reach their best accuracy."""
    scheduler = CASES[name][0](**SD_BETAS, prediction_type="v_prediction", use_exponential_sigmas=True,
                               rescale_betas_zero_snr=zero_snr)
    sigmas = discrete_sigmas(ScaledLinearSchedule(zero_terminal_snr=zero_snr), 10, "exponential")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, sigmas, noise, "v_prediction", seed=1, at_sigmas=True)
    ours = get_sampler(name)(analytic_denoiser, noise * sigmas[0], sigmas)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5  # measured unipc 1.5e-6


@pytest.mark.parametrize("name", [n for n in CASES if n != "heun"])  # diffusers' Heun has no zero-SNR option
def test_parity_with_diffusers_zero_terminal_snr(name: str) -> None:
    # Euler / DPM-Solver in diffusers also replace alpha_bar = 0 by 2^-24, so they agree to float precision; DDIM and
    # DDPM step from alpha_bar = 0 exactly, which our finite sigma_max = 4096 matches to O(sigma_1 / sigma_max).
    tol = 2e-3 if name in {"ddim", "ddpm"} else 1e-4  # measured: ddpm 4e-4, ddim 4e-6, euler 2e-5, others < 3e-6
    assert parity_error(name, "v_prediction", zero_snr=True) < tol


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_parity_with_diffusers(eta: float) -> None:
    assert parity_error("ddim", "epsilon", zero_snr=False, eta=eta) < 1e-5


def test_ddim_eta_one_is_ddpm() -> None:
    sigmas = discrete_sigmas(ScaledLinearSchedule(), 10, "leading")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ddim = get_sampler("ddim")(analytic_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), eta=1.0)
    ddpm = get_sampler("ddpm")(analytic_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ddim, ddpm)


# ---------------------------------------------------------------------------------------------------------------------
# Spacings.


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras"])
def test_spacing_matches_diffusers_euler(spacing: str, zero_snr: bool) -> None:
    kwargs = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing, "steps_offset": 1}
    scheduler = EulerDiscreteScheduler(**SD_BETAS, rescale_betas_zero_snr=zero_snr, **kwargs)
    scheduler.set_timesteps(25)
    ours = discrete_sigmas(ScaledLinearSchedule(zero_terminal_snr=zero_snr), 25, spacing, steps_offset=1)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert ours[-1] == 0 and (ours.diff() < 0).all() and ours.isfinite().all()


# schedule -> (ours, diffusers' beta arguments, tolerance of the whole ladder: diffusers' float32 alphas_cumprod moves
# its ends by up to 1.3e-5 relative for scaled_linear, 2.6e-4 for cosine and 1.9e-3 for cosine with zero SNR)
LADDER_CASES = {"scaled_linear": (ScaledLinearSchedule, SD_BETAS, 2e-5),
                "cosine": (CosineSchedule, {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}, 3e-3)}


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", list(LADDER_CASES))
def test_exponential_spacing_matches_diffusers(schedule: str, zero_snr: bool) -> None:
    """Uniform in log-SNR from sigma_max to sigma_min: diffusers' use_exponential_sigmas and DPM-Solver's
    use_lu_lambdas build the same ladder; the rule itself is checked to 1e-6 on diffusers' own ends."""
    schedule_cls, betas, rtol = LADDER_CASES[schedule]
    ours = discrete_sigmas(schedule_cls(zero_terminal_snr=zero_snr), 25, "exponential", dtype=torch.float64)
    kwargs = {**betas, "rescale_betas_zero_snr": zero_snr}
    for scheduler in (EulerDiscreteScheduler(**kwargs, use_exponential_sigmas=True),
                      UniPCMultistepScheduler(**kwargs, use_exponential_sigmas=True),
                      DPMSolverMultistepScheduler(**kwargs, use_lu_lambdas=True)):
        scheduler.set_timesteps(25)
        theirs = scheduler.sigmas.double()
        rule = sigmas_exponential(25, theirs[-2].item(), theirs[0].item())
        torch.testing.assert_close(rule, theirs, rtol=1e-6, atol=0)
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
    log_steps = ours[:-1].log().diff()
    torch.testing.assert_close(log_steps, log_steps.mean().expand(24))


def test_sampling_sigmas_exponential_on_continuous_schedule() -> None:
    sigmas = sampling_sigmas(KarrasSchedule(0.002, 80.0), 8, "exponential").double()
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002) and sigmas[-1] == 0
    step = math.log(0.002 / 80) / 7
    torch.testing.assert_close(sigmas[:-1].log().diff(), torch.full((7,), step, dtype=torch.float64))


def test_spacing_zero_snr_starts_at_finite_sigma_max() -> None:
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    assert math.isinf(schedule.sigmas[-1])
    assert discrete_sigmas(schedule, 10, "trailing")[0].item() == pytest.approx(ZERO_SNR_SIGMA)
    assert discrete_sigmas(schedule, 10, "karras")[0].item() == pytest.approx(ZERO_SNR_SIGMA)
    assert discrete_sigmas(schedule, 10, "exponential")[0].item() == pytest.approx(ZERO_SNR_SIGMA)


def test_spacing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps"):
        discrete_sigmas(ScaledLinearSchedule(), 0, "karras")
    with pytest.raises(ValueError, match="leading"):
        spaced_timesteps(1000, 10, "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exponential"):
        discrete_sigmas(ScaledLinearSchedule(), 10, "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        discrete_sigmas(ScaledLinearSchedule(), 0, "exponential")


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian oracle: data N(0, S^2) has the ideal denoiser x S^2 / (S^2 + sigma^2).


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * S**2 / (S**2 + append_dims(sigma, x.ndim) ** 2)


def gaussian_v_model(x_in: torch.Tensor, c_noise: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The ideal v-prediction network for N(0, S^2) data, in VP form; EDM's c_noise = ln(sigma) / 4 carries sigma."""
    sigma = append_dims(torch.exp(4 * c_noise), x_in.ndim)
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    x0 = alpha * S**2 / (alpha**2 * S**2 + sigma_vp**2) * x_in
    return (alpha * x_in - x0) / sigma_vp


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_gaussian_oracle_std(name: str) -> None:
    sigmas = sigmas_karras(500, 0.002, 80.0)  # enough steps that first-order bias (~1.5% at 500) < tolerance
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = get_sampler(name)(gaussian_denoiser, noise * sigmas[0], sigmas.double(),
                          generator=torch.Generator().manual_seed(1))
    assert x.std().item() == pytest.approx(S, rel=0.03)  # std of 16k draws has relative error ~0.6%


def gaussian_v_model_timestep(schedule: ScaledLinearSchedule):
    """The same network conditioned on the schedule's timestep t = c_noise, as a DDPM-trained model is."""

    def model(x_in: torch.Tensor, c_noise: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        alpha, sigma_vp = (c.view(-1, *[1] * (x_in.ndim - 1)) for c in schedule.alpha_sigma(c_noise))
        x0 = alpha * S**2 / (alpha**2 * S**2 + sigma_vp**2) * x_in  # VP form: finite at t = T - 1 (SNR = 0)
        return (alpha * x_in - x0) / sigma_vp

    return model


@pytest.mark.parametrize("conditioning", ["edm", "timestep"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_terminal_snr_v_prediction(name: str, conditioning: str) -> None:
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    sigmas = discrete_sigmas(schedule, 500, "trailing")
    if conditioning == "edm":  # c_noise = ln(sigma) / 4
        denoiser = Denoiser(gaussian_v_model, VPrediction())
    else:  # c_noise = t; the finite stand-in sigma 4096 maps to t = T - 1, where SNR = 0
        denoiser = Denoiser(gaussian_v_model_timestep(schedule), VPrediction(schedule))
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    x = get_sampler(name)(lambda x, sigma: denoiser(x, sigma), noise * sigmas[0], sigmas,
                          generator=torch.Generator().manual_seed(1))
    assert x.isfinite().all()
    assert x.std().item() == pytest.approx(S, rel=0.03)


# ---------------------------------------------------------------------------------------------------------------------
# Registry, arguments, callback.


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="dpmpp_2m_sde") as err:
        get_sampler("plms")
    assert all(name in str(err.value) for name in SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_rejects_empty_or_infinite_ladder(name: str) -> None:
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="steps"):
        get_sampler(name)(gaussian_denoiser, x, torch.zeros(1))
    with pytest.raises(ValueError, match="finite"):
        get_sampler(name)(gaussian_denoiser, x, torch.tensor([math.inf, 1.0, 0.0]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_sees_every_step(name: str) -> None:
    seen: list[int] = []
    sigmas = sigmas_karras(5, 0.1, 10.0)
    get_sampler(name)(gaussian_denoiser, torch.randn(2, 3) * 10, sigmas, callback=lambda i, x, d: seen.append(i))
    assert seen == list(range(5))


# ---------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance.


class CountingDenoiser:
    """D(x, sigma, context) whose output depends on the context, counting forwards."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return gaussian_denoiser(x, sigma) + append_dims(context.mean(dim=(1, 2)), x.ndim) * torch.tanh(x)


def _cfg_inputs():
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(3, 4, 5, 5, generator=g), torch.tensor([0.5, 2.0, 8.0])
    cond, uncond = torch.randn(3, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    return x, sigma, cond, uncond


def test_cfg_scale_one_is_the_conditional_denoiser() -> None:
    x, sigma, cond, uncond = _cfg_inputs()
    model = CountingDenoiser()
    assert torch.equal(cfg_denoiser(model, cond, uncond, scale=1.0)(x, sigma), model(x, sigma, cond))


def test_cfg_one_batched_forward_and_rescale() -> None:
    x, sigma, cond, uncond = _cfg_inputs()
    model = CountingDenoiser()
    guided = cfg_denoiser(model, cond, uncond, scale=7.5)(x, sigma)
    assert model.calls == 1
    d_cond, d_uncond = model(x, sigma, cond), model(x, sigma, uncond.expand_as(cond))
    reference = d_uncond + 7.5 * (d_cond - d_uncond)
    torch.testing.assert_close(guided, reference)
    torch.testing.assert_close(cfg_denoiser(model, cond, uncond, scale=7.5, rescale=0.0)(x, sigma), guided)
    rescaled = cfg_denoiser(model, cond, uncond, scale=7.5, rescale=0.7)(x, sigma)
    torch.testing.assert_close(rescaled, rescale_noise_cfg(reference, d_cond, guidance_rescale=0.7))
    full = cfg_denoiser(model, cond, uncond, scale=7.5, rescale=1.0)(x, sigma)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), d_cond.std(dim=(1, 2, 3)))


def test_zero_snr_stand_in_sigma_maps_to_the_last_timestep() -> None:
    """The finite stand-in for sigma = inf must condition timestep models on t = T - 1, as in diffusers."""
    from ldm.diffusion.schedules import ScaledLinearSchedule
    from ldm.diffusion.spacing import ZERO_SNR_SIGMA

    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    t = schedule.sigma_to_t(torch.tensor([ZERO_SNR_SIGMA, float("inf")]))
    assert torch.allclose(t, torch.tensor([999.0, 999.0]), atol=1e-3)
    knots = torch.arange(0, 999, 37, dtype=torch.float32)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(knots)), knots, atol=1e-3, rtol=0)


@pytest.mark.parametrize("n", [4, 10, 20])
def test_dpmpp_3m_parity_at_every_length(n: int) -> None:
    """Third order from the third step on; below 15 steps the second-to-last step drops to second order (diffusers'
    lower_order_final), from 15 on it stays third order. The third-order term must be what agrees, not vanish."""
    from ldm.diffusion.samplers import sample_dpmpp_2m, sample_dpmpp_3m

    factory = CASES["dpmpp_3m"][0]
    scheduler = factory(**SD_BETAS, prediction_type="epsilon", timestep_spacing="trailing")
    sigmas = discrete_sigmas(ScaledLinearSchedule(), n, "trailing")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, sigmas, noise, "epsilon", seed=1)
    ours = sample_dpmpp_3m(analytic_denoiser, noise * sigmas[0], sigmas)
    second_order = sample_dpmpp_2m(analytic_denoiser, noise * sigmas[0], sigmas)
    scale = theirs.abs().max()
    assert ((ours - theirs).abs().max() / scale).item() < 1e-5
    gap = ((second_order - theirs).abs().max() / scale).item()
    assert gap > 1e-3 if n >= 5 else gap < 1e-6  # 4 steps: orders 1, 2, 2 (lower order second), 1: it is 2M


@pytest.mark.parametrize("spacing", ["trailing", "exponential"])
@pytest.mark.parametrize("n", [4, 10, 20])
@pytest.mark.parametrize("order", [1, 2])
def test_unipc_order_parity(order: int, n: int, spacing: str) -> None:
    """UniPC-p against UniPCMultistepScheduler(solver_order=p): the general order conditions (a linear solve for the
    predictor's and the corrector's weights) agree with diffusers at orders 1 and 2 (3, the default, is in CASES), on
    the trailing ladder and off the timestep grid. The default's third-order term must differ from these, not
    vanish."""
    kwargs = {"timestep_spacing": "trailing"} if spacing == "trailing" else {"use_exponential_sigmas": True}
    scheduler = UniPCMultistepScheduler(**SD_BETAS, solver_order=order, solver_type="bh2", predict_x0=True,
                                        lower_order_final=True, final_sigmas_type="zero",
                                        prediction_type="v_prediction", **kwargs)
    sigmas = discrete_sigmas(ScaledLinearSchedule(), n, spacing)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(scheduler, sigmas, noise, "v_prediction", seed=1, at_sigmas=spacing != "trailing")
    unipc = get_sampler("unipc")
    ours = unipc(analytic_denoiser, noise * sigmas[0], sigmas, order=order)
    scale = theirs.abs().max()
    assert ((ours - theirs).abs().max() / scale).item() < 1e-5  # measured 3e-7 .. 1.5e-6
    gap = ((unipc(analytic_denoiser, noise * sigmas[0], sigmas) - theirs).abs().max() / scale).item()  # order 3
    assert gap > 1e-4 if n >= 5 or order == 1 else gap < 1e-6  # 4 steps: orders 1, 2, 2, 1 even when 3 is asked


def test_unipc_rejects_an_unknown_order() -> None:
    sigmas = discrete_sigmas(ScaledLinearSchedule(), 4, "trailing")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        get_sampler("unipc")(analytic_denoiser, torch.zeros(1, 2), sigmas, order=4)


@pytest.mark.parametrize("n", [4, 10, 20])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "karras"])
def test_deis_parity(spacing: str, n: int) -> None:
    """DEIS-3 ("logrho") against DEISMultistepScheduler(solver_order=3) on diffusers' own ladder (which ends at
    sigma_min, or repeats its last sigma: an empty step), its last step on leading included (a 3-5x step growth)."""
    from diffusers import DEISMultistepScheduler

    kwargs = {"use_karras_sigmas": True} if spacing == "karras" else \
        {"timestep_spacing": spacing, "steps_offset": int(spacing == "leading")}
    scheduler = DEISMultistepScheduler(**SD_BETAS, solver_order=3, prediction_type="epsilon", **kwargs)
    scheduler.set_timesteps(n)
    sigmas = scheduler.sigmas.double()  # VE, n + 1 values, the last one not 0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = diffusers_model(scheduler, "epsilon")
    x = noise * sigmas[0] / (1 + sigmas[0] ** 2).sqrt()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t, float(scheduler.sigmas[i])), t, x).prev_sample
    theirs = x * (1 + sigmas[-1] ** 2).sqrt()  # back to VE
    ours = get_sampler("deis")(analytic_denoiser, (noise * sigmas[0]).double(), sigmas)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 5e-5  # measured 3e-7 .. 2.1e-5 (float32)
    first_order = get_sampler("deis")(analytic_denoiser, (noise * sigmas[0]).double(), sigmas, order=1)
    assert ((first_order - theirs).abs().max() / theirs.abs().max()).item() > 1e-3  # the multistep terms count
