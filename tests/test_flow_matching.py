"""Rectified flow in the log-SNR algebra: the schedule and FlowPrediction against their closed forms, the loss against
the plain velocity MSE, SD3's and Flux's shifts as one log-SNR offset, timestep densities against diffusers' SD3
training code, Euler parity with diffusers' FlowMatchEulerDiscreteScheduler from t = 1, and every sampler from pure
noise to sigma = 0 on a Gaussian."""

import itertools
import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from omegaconf import OmegaConf

from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.noise_levels import CosMapTimesteps, LogitNormalTimesteps, ModeTimesteps, UniformTimesteps
from ldm.diffusion.parameterization import (
    Denoiser,
    EpsPrediction,
    FlowPrediction,
    VPrediction,
    X0Prediction,
    append_dims,
)
from ldm.diffusion.samplers import PURE_NOISE_SIGMA, SAMPLERS, get_sampler, sample_from_noise
from ldm.diffusion.schedules import RectifiedFlow, ScaledLinearSchedule, vp_from_logsnr, vp_from_sigma
from ldm.diffusion.shift import ShiftedSchedule, TimestepShift
from ldm.diffusion.spacing import OPEN_END_STEPS, auto_spacing, discrete_sigmas, sampling_sigmas
from ldm.diffusion.weighting import FlowVelocity, MinSNR, Uniform

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).resolve().parents[1] / "conf" / "diffusion"
S = 0.5  # data std of the Gaussian oracle
T = torch.tensor([0.0, 1e-4, 0.1, 0.25, 0.5, 0.75, 0.9, 0.9999, 1.0], dtype=torch.float64)  # both ends included
INNER = slice(1, -1)


def close(a, b, **kw) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               **({"rtol": 1e-12, "atol": 1e-12} | kw))


# ---------------------------------------------------------------------------------------------------------------------
# Closed forms.


def test_rectified_flow_schedule_closed_forms() -> None:
    s = RectifiedFlow()
    close(s.logsnr(T), 2 * torch.log((1 - T) / T))  # +inf at t = 0, -inf at t = 1
    close(s.t_to_sigma(T), T / (1 - T))  # VE sigma: 0 and inf at the ends
    r = ((1 - T) ** 2 + T**2).sqrt()  # x_t = r * x_vp
    alpha, sigma = s.alpha_sigma(T)
    close(alpha, (1 - T) / r)
    close(sigma, T / r)
    close(alpha + sigma, 1 / r)  # x_t = x_vp / (alpha + sigma)
    # x_ve = x0 + sigma_ve eps = x_t / (1 - t), x_t = (1 - t) x0 + t eps, away from t = 1
    x0, eps = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = T[:-1, None]
    close((x0 + s.t_to_sigma(t) * eps) * (1 - t), (1 - t) * x0 + t * eps)


def test_rectified_flow_round_trips() -> None:
    s = RectifiedFlow()
    close(s.sigma_to_t(s.t_to_sigma(T)), T)  # exact at t = 0 and 1 too
    close(s.t_from_logsnr(s.logsnr(T)), T, rtol=1e-10, atol=1e-12)
    close(s.sigma_to_t(torch.tensor([0.0, math.inf])), [0.0, 1.0])
    with pytest.raises(ValueError, match="t_min"):
        RectifiedFlow(t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="t_max"):
        RectifiedFlow(t_max=1.5)


def test_flow_prediction_scalings_closed_forms() -> None:
    p, s = FlowPrediction(), RectifiedFlow()
    sigma = s.t_to_sigma(T)  # 0 .. inf
    c_skip, c_out, c_in, c_noise = p(sigma)
    close(c_skip, 1 - T)  # = 1 / (1 + sigma)
    close(c_in, 1 - T)
    close(c_out, -T, rtol=1e-9)  # = -sigma / (1 + sigma), -1 at sigma = inf
    close(c_noise, 1000 * T, rtol=1e-9, atol=1e-9)  # SD3's timestep
    close(FlowPrediction(timestep_scale=1.0).c_noise(s.logsnr(T)), T, rtol=1e-9, atol=1e-12)
    alpha, sigma_vp = vp_from_sigma(sigma)
    c_skip_vp, c_out_vp, c_in_vp = p.scalings_vp(alpha, sigma_vp)
    close(c_skip_vp, 1 / (alpha + sigma_vp))
    close(c_in_vp, 1 / (alpha + sigma_vp))
    close(c_out_vp, -T, rtol=1e-9, atol=1e-12)
    close(c_skip_vp[:-1], c_skip[:-1] / alpha[:-1])  # VP = VE acting on x_vp = alpha x_ve (alpha > 0)
    close(c_in_vp[:-1], c_in[:-1] / alpha[:-1])
    close(p.log_c_out_squared(s.logsnr(T)), 2 * T.log(), rtol=1e-9, atol=1e-12)
    assert all(c.isfinite().all() for c in (c_skip_vp, c_out_vp, c_in_vp, c_noise))  # finite at both ends


def test_flow_prediction_target_and_denoiser() -> None:
    p, s = FlowPrediction(), RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, len(T), 5, dtype=torch.float64, generator=g)
    t = T[:, None]
    alpha, sigma = (append_dims(c, 2) for c in s.alpha_sigma(T))
    x_vp = alpha * x0 + sigma * eps
    close(x_vp / (alpha + sigma), (1 - t) * x0 + t * eps)  # the network input is x_t itself
    target = p.target(x0, eps, alpha, sigma)
    close(target, eps - x0)
    c_skip, c_out, c_in = p.scalings_vp(alpha, sigma)
    close((x0 - c_skip * x_vp)[1:] / c_out[1:], target[1:], rtol=1e-9, atol=1e-9)  # (x0 - c_skip x) / c_out, c_out != 0
    close(c_skip * x_vp + c_out * target, x0)  # D = x_t - t v is exact at every t, 0 and 1 included

    def exact_velocity(x_in, c_noise, context):  # sees x_t and t * 1000; x0, eps known per row
        assert torch.allclose(x_in, (1 - c_noise[:, None] / 1000) * x0[1:-1] + c_noise[:, None] / 1000 * eps[1:-1])
        return eps[1:-1] - x0[1:-1]

    sigma_ve = s.t_to_sigma(T[INNER])  # VE form (finite sigma)
    close(Denoiser(exact_velocity, p)(x0[INNER] + append_dims(sigma_ve, 2) * eps[INNER], sigma_ve), x0[INNER],
          rtol=1e-9, atol=1e-9)


def test_validation_bins_on_flow() -> None:
    """The module's x0-error bins build x from log-SNR in VP form: finite and exact for FlowPrediction."""
    p = FlowPrediction()
    logsnr = torch.tensor([-math.inf, -12.0, -4.0, 0.0, 4.0, 12.0, math.inf], dtype=torch.float64)
    alpha, sigma = (append_dims(c, 2) for c in vp_from_logsnr(logsnr))
    x0, eps = torch.randn(2, len(logsnr), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = alpha * x0 + sigma * eps
    c_skip, c_out, c_in = p.scalings_vp(alpha, sigma)
    assert p.c_noise(logsnr).isfinite().all()
    close(c_skip * x + c_out * (eps - x0), x0)


# ---------------------------------------------------------------------------------------------------------------------
# Loss and weighting.


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear velocity v(x_t, t), t (B,): the exact one for N(0, S^2) data plus a tanh term."""
    t = append_dims(t.to(x.dtype), x.ndim)
    return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x + 0.3 * torch.tanh(x) * (1 - t) + 0.1 * t


def test_loss_is_the_plain_velocity_mse() -> None:
    x0 = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = DenoisingLoss(RectifiedFlow(), FlowPrediction(), Uniform(), UniformTimesteps())
    out = loss(lambda x, c_noise, context: toy_velocity(x, c_noise / 1000), x0,
               generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the loss draws t, then eps
    t = torch.rand(16, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = append_dims(1 - t, 4) * x0 + append_dims(t, 4) * eps
    expected = (toy_velocity(x_t, t) - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.t, t)
    torch.testing.assert_close(out.loss, expected, rtol=2e-5, atol=1e-6)
    # FlowVelocity is that same MSE: weight 1 on FlowPrediction's F
    same = DenoisingLoss(RectifiedFlow(), FlowPrediction(), FlowVelocity(), UniformTimesteps())
    torch.testing.assert_close(same(lambda x, c, ctx: toy_velocity(x, c / 1000), x0,
                                    generator=torch.Generator().manual_seed(1)).loss, out.loss)
    torch.testing.assert_close(FlowVelocity()(RectifiedFlow().logsnr(T.float()), FlowPrediction()),
                               torch.ones(len(T)))


def test_velocity_mse_for_an_x0_network() -> None:
    """FlowVelocity on another parameterization (x0) is the velocity MSE of the velocity that network implies."""
    schedule = RectifiedFlow(t_min=0.01, t_max=0.99)  # 1 / t^2 on x0 has no finite weight at t = 0
    x0 = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(0))

    def x0_model(x_vp, t, context):  # X0Prediction: c_in = 1 on x_vp, c_noise = t; D = x_t - t v
        alpha, sigma = (append_dims(c, 4) for c in schedule.alpha_sigma(t))
        x_t = x_vp / (alpha + sigma)
        return x_t - append_dims(t, 4) * toy_velocity(x_t, t)

    out = DenoisingLoss(schedule, X0Prediction(schedule), FlowVelocity())(x0_model, x0,
                                                                          generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = 0.01 + torch.rand(16, generator=g) * 0.98
    eps = torch.randn(x0.shape, generator=g)
    x_t = append_dims(1 - t, 4) * x0 + append_dims(t, 4) * eps
    expected = (toy_velocity(x_t, t) - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)


def test_ill_posed_flow_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="FlowVelocity with X0Prediction on RectifiedFlow"):
        DenoisingLoss(RectifiedFlow(), X0Prediction(), FlowVelocity())  # 1 / t^2 on x0 at t = 0
    with pytest.raises(ValueError, match="EpsPrediction on RectifiedFlow"):
        DenoisingLoss(RectifiedFlow(), EpsPrediction(), MinSNR())  # c_noise = ln(sigma) / 4 at sigma = inf
    for weighting in (Uniform(), FlowVelocity(), MinSNR()):  # the flow's own combinations are finite
        DenoisingLoss(RectifiedFlow(), FlowPrediction(), weighting)
    DenoisingLoss(RectifiedFlow(), VPrediction(RectifiedFlow()), MinSNR())


# ---------------------------------------------------------------------------------------------------------------------
# Timestep densities (SD3, Sec. 3.1) against diffusers' SD3 training code.


@pytest.mark.parametrize(("scheme", "ours"), [("logit_normal", LogitNormalTimesteps(0.0, 1.0)),
                                              ("mode", ModeTimesteps(1.29)), ("uniform", UniformTimesteps())])
def test_timestep_densities_match_diffusers(scheme: str, ours) -> None:
    theirs = compute_density_for_timestep_sampling(scheme, 4096, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(0))
    level = ours(RectifiedFlow(), 4096, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(level.t, theirs, rtol=1e-6, atol=1e-6)
    close(level.logsnr.double(), RectifiedFlow().logsnr(level.t.double()), rtol=1e-5, atol=1e-5)


def test_mode_and_cosmap_densities() -> None:
    g = torch.Generator().manual_seed(0)
    uniform = ModeTimesteps(scale=0.0)(RectifiedFlow(), 8, generator=g).t
    torch.testing.assert_close(uniform, 1 - torch.rand(8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="mode scale"):
        ModeTimesteps(scale=2.0)
    # CosMap's density dt/du^-1 is diffusers' "cosmap" loss weight 2 / (pi (1 - 2t + 2t^2)), which it stands for
    t = CosMapTimesteps()(RectifiedFlow(), 4096, generator=torch.Generator().manual_seed(0)).t.double()
    u = 2 / math.pi * torch.atan(t / (1 - t))  # the inverse of t = 1 - 1 / (tan(pi u / 2) + 1)
    close(u, torch.rand(4096, generator=torch.Generator().manual_seed(0)).double(), rtol=1e-5, atol=1e-6)
    tt = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (density,) = torch.autograd.grad((2 / math.pi * torch.atan(tt / (1 - tt))).sum(), tt)
    close(density, compute_loss_weighting_for_sd3("cosmap", tt.detach()), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# The shift: one log-SNR offset for training and sampling.


def test_sd3_shift_is_a_logsnr_offset() -> None:
    base = RectifiedFlow()
    for s in (0.5, 3.0, 6.0):
        shifted = TimestepShift(s).apply(base)
        assert isinstance(shifted, ShiftedSchedule) and shifted.logsnr_offset == pytest.approx(-2 * math.log(s))
        sd3 = s * T / (1 + (s - 1) * T)  # t' of SD3 (Esser et al. 2024, Sec. 5.3.2)
        close(base.sigma_to_t(shifted.t_to_sigma(T)), sd3, rtol=1e-12, atol=1e-15)
        close(shifted.t_to_sigma(T), s * base.t_to_sigma(T))  # VE sigma times s
        offset = torch.full((len(T) - 2,), -2 * math.log(s), dtype=torch.float64)
        close((shifted.logsnr(T) - base.logsnr(T))[INNER], offset, rtol=1e-12, atol=1e-14)
        close(shifted.t_from_logsnr(shifted.logsnr(T)), T, rtol=1e-9, atol=1e-12)
        close(shifted.sigma_to_t(shifted.t_to_sigma(T)), T, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(shifted.get_sigmas(10), s * base.get_sigmas(10))
    assert TimestepShift(1.0).apply(base) is base


def flux_calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """diffusers.pipelines.flux.pipeline_flux.calculate_shift, copied (its module needs `transformers`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@pytest.mark.parametrize(("latent_h", "latent_w", "patch"), [(32, 32, 2), (64, 64, 2), (128, 96, 2), (64, 64, 1)])
def test_flux_shift_at_resolution(latent_h: int, latent_w: int, patch: int) -> None:
    shift = TimestepShift(shift=None)  # Flux's defaults
    seq_len = (latent_h // patch) * (latent_w // patch)
    mu = flux_calculate_shift(seq_len)
    assert shift.mu(seq_len) == pytest.approx(mu, rel=1e-12)
    assert shift.for_resolution(latent_h, latent_w, patch) == pytest.approx(-2 * mu, rel=1e-12)
    shifted = shift.apply(RectifiedFlow(), latent_h, latent_w, patch)
    flux = math.exp(mu) / (math.exp(mu) + (1 / T[1:] - 1))  # Flux's time_shift(mu, 1, t), t > 0
    close(RectifiedFlow().sigma_to_t(shifted.t_to_sigma(T[1:])), flux, rtol=1e-12, atol=1e-15)


def test_timestep_shift_fields_and_errors() -> None:
    shift = TimestepShift(shift=None)
    assert shift.dynamic and shift.mu(256) == pytest.approx(0.5) and shift.mu(4096) == pytest.approx(1.15)
    assert TimestepShift(**shift.state_dict()) == shift
    assert TimestepShift(3.0).for_resolution() == pytest.approx(-2 * math.log(3.0))
    with pytest.raises(ValueError, match="latent_h and latent_w"):
        shift.for_resolution()
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        shift.for_resolution(33, 32, 2)
    with pytest.raises(ValueError, match="shift must be > 0"):
        TimestepShift(0.0)


def test_shift_moves_training_noise_levels_and_ladders_alike() -> None:
    base = RectifiedFlow()
    shifted = TimestepShift(3.0).apply(base)
    for sampler in (LogitNormalTimesteps(), ModeTimesteps(), UniformTimesteps()):
        a = sampler(base, 64, generator=torch.Generator().manual_seed(0))
        b = sampler(shifted, 64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(b.t, a.t)  # the same t ...
        torch.testing.assert_close(b.logsnr, a.logsnr - 2 * math.log(3.0))  # ... moved in log-SNR
    torch.testing.assert_close(sampling_sigmas(shifted, 8, "linspace"), 3 * sampling_sigmas(base, 8, "linspace"))
    # a discrete base: its table and every spacing move by the same factor
    sl = ScaledLinearSchedule()
    shifted_sl = ShiftedSchedule(sl, -2 * math.log(2.0))
    for spacing in ("trailing", "karras", "exponential"):
        torch.testing.assert_close(discrete_sigmas(shifted_sl, 10, spacing), 2 * discrete_sigmas(sl, 10, spacing))
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(shifted_sl.sigma_to_t(shifted_sl.t_to_sigma(t)), t.float(), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Ladders and their ends.


def test_flow_ladder_ends() -> None:
    sigmas = RectifiedFlow().get_sigmas(4)  # t = 1, 3/4, 1/2, 1/4, 0: one 0, at the end
    close(sigmas, [math.inf, 3.0, 1.0, 1 / 3, 0.0], rtol=1e-6)
    torch.testing.assert_close(sampling_sigmas(RectifiedFlow(), 4, "linspace"), sigmas)  # SD3's / Flux's
    inner = RectifiedFlow(t_min=0.2, t_max=0.8).get_sigmas(3)  # sigma(t_min) > 0: 0 appended as before
    close(inner, [4.0, 1.0, 0.25, 0.0], rtol=1e-6)
    for name in SAMPLERS:  # a 0 before the end would divide by 0: refused by name
        with pytest.raises(ValueError, match="only the last sigma may be 0"):
            get_sampler(name)(lambda x, s: x, torch.ones(2, 3), torch.tensor([1.0, 0.0, 0.0]))


def test_flow_sigma_spacings_and_auto() -> None:
    """Sigma spacings on the open range 0 .. inf: one exact step from pure noise to k n, then down to 1 / (k n)
    (k = OPEN_END_STEPS), then 0; "auto" (exponential_capped) caps the top at 0.5 n instead (bench/samplers.py
    --family)."""
    k = OPEN_END_STEPS
    for schedule in (RectifiedFlow(), TimestepShift(3.0).apply(RectifiedFlow()), ScaledLinearSchedule(),
                     RectifiedFlow(1e-3, 0.999)):  # one rule for every schedule
        assert auto_spacing(schedule) == auto_spacing(schedule, "unipc") == "exponential_capped"
        assert auto_spacing(schedule, "deis") == auto_spacing(schedule, "heun") == "karras_capped"
    n = 10
    sigmas = sampling_sigmas(RectifiedFlow(), n, "auto").double()
    assert sigmas[0] == math.inf and sigmas[-1] == 0 and len(sigmas) == n + 1
    close(sigmas[1:-1], torch.logspace(math.log10(0.5 * n), math.log10(1 / (k * n)), n - 1, dtype=torch.float64),
          rtol=1e-6)
    exponential = sampling_sigmas(RectifiedFlow(), n, "exponential").double()
    close(exponential[1:-1], torch.logspace(math.log10(k * n), math.log10(1 / (k * n)), n - 1,
                                            dtype=torch.float64), rtol=1e-6)
    karras = sampling_sigmas(RectifiedFlow(), n, "karras").double()
    close(karras[[1, -2]], [k * n, 1 / (k * n)], rtol=1e-6)
    for spacing in ("exponential", "karras", "linspace"):  # the shift moves every ladder by its factor
        torch.testing.assert_close(sampling_sigmas(TimestepShift(3.0).apply(RectifiedFlow()), n, spacing),
                                   3 * sampling_sigmas(RectifiedFlow(), n, spacing))
    close(sampling_sigmas(RectifiedFlow(), 1, "exponential"), [math.inf, 0.0])  # one step: D at pure noise
    closed = sampling_sigmas(RectifiedFlow(t_min=0.5 / 1.5, t_max=0.6), 3, "exponential").double()  # no open end
    close(closed, [1.5, 1.5**0.5 / 2**0.5, 0.5, 0.0], rtol=1e-6)


def gaussian_flow_denoiser() -> Denoiser:
    """The ideal FlowPrediction network for N(0, S^2) data behind the Denoiser wrapper (VE in, x0 out)."""
    def velocity(x_t, c_noise, context):
        t = append_dims(c_noise / 1000, x_t.ndim)
        return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * x_t

    return Denoiser(velocity, FlowPrediction())


@pytest.mark.parametrize(("shift", "spacing"), [(1.0, "auto"), (3.0, "linspace")])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_from_pure_noise_on_a_gaussian(name: str, shift: float, spacing: str) -> None:
    sigmas = sampling_sigmas(TimestepShift(shift).apply(RectifiedFlow()), 400, spacing).double()
    assert sigmas[0] == math.inf and sigmas[-1] == 0 and (sigmas[1:-1] > 0).all()
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_from_noise(name, gaussian_flow_denoiser(), noise, sigmas, generator=torch.Generator().manual_seed(1))
    assert x.isfinite().all()
    assert x.std().item() == pytest.approx(S, rel=0.03)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_few_steps_are_finite_at_both_ends(name: str) -> None:
    denoiser = gaussian_flow_denoiser()
    noise = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    for n, spacing in itertools.product((1, 2, 3, 5), ("linspace", "exponential", "karras")):
        sigmas = sampling_sigmas(RectifiedFlow(), n, spacing)
        seen.clear()
        x = sample_from_noise(name, denoiser, noise, sigmas, generator=torch.Generator().manual_seed(1),
                              callback=lambda i, x, d: seen.append((i, x.isfinite().all(), d.isfinite().all())))
        assert x.isfinite().all() and x.dtype == noise.dtype
        assert [i for i, *_ in seen] == list(range(n)) and all(a and b for _, a, b in seen)
    # fp16 noise: D is taken in float32 at sigma = 2^30 (over fp16's range), the result comes back in fp16
    x = sample_from_noise(name, denoiser, noise.half(), sampling_sigmas(RectifiedFlow(), 4, "linspace"))
    assert x.dtype == torch.float16 and x.isfinite().all()


def test_sample_from_noise_with_a_finite_start_is_the_sampler() -> None:
    denoiser = gaussian_flow_denoiser()
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    sigmas = sampling_sigmas(RectifiedFlow(t_max=0.9), 6, "linspace")
    assert sigmas[0].isfinite()
    torch.testing.assert_close(sample_from_noise("unipc", denoiser, noise, sigmas, x0=x0),
                               get_sampler("unipc")(denoiser, x0 + noise * sigmas[0], sigmas))
    with pytest.raises(ValueError, match="finite second sigma"):
        sample_from_noise("euler", denoiser, noise, torch.tensor([math.inf, math.inf, 0.0]))


def test_pure_noise_denoiser_call_is_exact_in_float32() -> None:
    """At sigma = 2^30, FlowPrediction's Denoiser sees exactly x_t = noise and t = 1000, as at t = 1 itself."""
    seen = {}

    def model(x_in, c_noise, context):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.zeros_like(x_in)

    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sample_from_noise("euler", Denoiser(model, FlowPrediction()), noise, torch.tensor([math.inf, 0.0]))
    assert torch.equal(seen["x_in"], noise) and torch.equal(seen["c_noise"], torch.full((4,), 1000.0))
    assert PURE_NOISE_SIGMA**2 < torch.finfo(torch.float32).max  # VP scalings' sigma^2 stays finite


# ---------------------------------------------------------------------------------------------------------------------
# Parity with diffusers' FlowMatchEulerDiscreteScheduler, step by step from t = 1.


def euler_parity(scheduler: FlowMatchEulerDiscreteScheduler, sigmas: torch.Tensor, set_timesteps: dict) -> dict:
    """Max relative differences of the ladders (as flow t) and of x_t before every step and at the end."""
    n = len(sigmas) - 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(**set_timesteps)
    theirs, sample = [], noise.clone()
    for t in scheduler.timesteps:
        theirs.append(sample)
        sample = scheduler.step(toy_velocity(sample, t.expand(2) / 1000), t, sample).prev_sample
    ours = []
    denoiser = Denoiser(lambda x, c_noise, context: toy_velocity(x, c_noise / 1000), FlowPrediction())
    at = sigmas.clamp(max=PURE_NOISE_SIGMA)  # step 0's x is noise * PURE_NOISE_SIGMA, where D was taken
    final = sample_from_noise("euler", denoiser, noise, sigmas,
                              callback=lambda i, x, d: ours.append(x / (1 + at[i])))  # x_t = x_ve / (1 + sigma)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert len(ours) == len(theirs) == n
    return {"ladder": rel(RectifiedFlow().sigma_to_t(sigmas.double()), scheduler.sigmas.double()),
            "steps": max(rel(a, b) for a, b in zip(ours, theirs)), "final": rel(final, sample)}


def test_euler_parity_with_flow_match_euler_sd3_shift() -> None:
    """SD3: shift 3, diffusers' default set_timesteps(n): t evenly from 1 to its own sigma_min (= shift(1/1000), the
    train table's end) and shifted again, then 0; ours: the same base t range under TimestepShift(3)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = TimestepShift(3.0).apply(RectifiedFlow(t_min=scheduler.sigma_min))
    errors = euler_parity(scheduler, sampling_sigmas(schedule, 28, "linspace"), {"num_inference_steps": 28})
    assert errors["ladder"] < 1e-6 and errors["steps"] < 1e-5 and errors["final"] < 1e-5, errors


def test_euler_parity_with_flow_match_euler_dynamic_shift() -> None:
    """Flux: mu from the sequence length of 64x64 latents in 2x2 patches (1024 tokens), sigmas linspace(1, 1/n, n)
    as its pipeline passes them; ours: t evenly from 1 to 0 under TimestepShift(None) at that size."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    n, mu = 20, flux_calculate_shift(1024)
    schedule = TimestepShift(None).apply(RectifiedFlow(), 64, 64, patch=2)
    errors = euler_parity(scheduler, sampling_sigmas(schedule, n, "linspace"),
                          {"sigmas": np.linspace(1.0, 1 / n, n), "mu": mu})
    assert errors["ladder"] < 1e-6 and errors["steps"] < 1e-5 and errors["final"] < 1e-5, errors


# ---------------------------------------------------------------------------------------------------------------------
# Configs.


def test_flow_configs_instantiate() -> None:
    schedule = hydra.utils.instantiate(OmegaConf.load(CONF / "schedule" / "rectified_flow.yaml"))
    assert isinstance(schedule, RectifiedFlow) and (schedule.t_min, schedule.t_max) == (0.0, 1.0)
    parameterization = hydra.utils.instantiate(OmegaConf.load(CONF / "parameterization" / "flow.yaml"))
    assert isinstance(parameterization, FlowPrediction) and parameterization.timestep_scale == 1000.0
    mode = hydra.utils.instantiate(OmegaConf.load(CONF / "noise_levels" / "mode.yaml"))
    assert isinstance(mode, ModeTimesteps) and mode.scale == 1.29
    assert isinstance(hydra.utils.instantiate(OmegaConf.load(CONF / "noise_levels" / "cosmap.yaml")), CosMapTimesteps)
    logit_normal = hydra.utils.instantiate(OmegaConf.load(CONF / "noise_levels" / "logit_normal.yaml"))
    assert (logit_normal.mean, logit_normal.std) == (0.0, 1.0)  # SD3's
    assert isinstance(hydra.utils.instantiate(OmegaConf.load(CONF / "weighting" / "flow_velocity.yaml")), FlowVelocity)
    shifts = {p.stem: hydra.utils.instantiate(OmegaConf.load(p)) for p in (CONF / "shift").glob("*.yaml")}
    assert shifts == {"none": TimestepShift(1.0), "sd3": TimestepShift(3.0), "flux": TimestepShift(None)}
    DenoisingLoss(schedule, parameterization, Uniform(), logit_normal)  # a valid combination


def test_v_prediction_on_the_flow_schedule_from_pure_noise() -> None:
    """Any parameterization finite at SNR 0 samples the flow process: v-prediction conditioned on the flow's t."""
    schedule = RectifiedFlow()

    def v_model(x_in, c_noise, context):  # the ideal VP-form v network for N(0, S^2), c_noise = t
        alpha, sigma = (append_dims(c, x_in.ndim) for c in schedule.alpha_sigma(c_noise))
        x0 = alpha * S**2 / (alpha**2 * S**2 + sigma**2) * x_in
        return (alpha * x_in - x0) / sigma

    denoiser = Denoiser(v_model, VPrediction(schedule))
    noise = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("unipc", "euler"):
        x = sample_from_noise(name, denoiser, noise, sampling_sigmas(schedule, 200).double())
        assert x.isfinite().all() and x.std().item() == pytest.approx(S, rel=0.03)


# ---------------------------------------------------------------------------------------------------------------------
# The oracle behind the flow default (bench/samplers.py --schedule rectified_flow).


def _bench():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_flow_oracle_reference_and_harness() -> None:
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 5, generator=g, dtype=torch.float64)
    s = 0.2 + torch.rand(1, 5, generator=g, dtype=torch.float64)
    single = bench.GaussianMixture(mu, s, torch.zeros(1, dtype=torch.float64))
    noise = torch.randn(4, 5, generator=g, dtype=torch.float64)
    # one Gaussian: x_t - (1 - t) mu = noise sqrt((1 - t)^2 s^2 + t^2), so x_0 = mu + s noise
    torch.testing.assert_close(bench.flow_reference(single, noise), mu + s * noise, rtol=1e-8, atol=1e-8)
    x0, eps = single.flow_posterior(noise, 1.0)  # at t = 1: the mean, and the input itself
    torch.testing.assert_close(x0, mu.expand(4, 5))
    torch.testing.assert_close(eps, noise)
    # where the ladders agree, diffusers' FlowMatchEuler driven by the harness gives our samples
    mixture = bench.make_mixture(dim=8, components=4, seed=0)
    ours, nfe = bench.run_ours_flow("euler", mixture, noise.repeat(1, 2)[:, :8], bench.flow_ladder(6, "linspace_s3"))
    theirs, nfe_theirs = bench.run_diffusers_flow(bench.flow_scheduler("euler", "linspace_s3"), 6, mixture,
                                                  noise.repeat(1, 2)[:, :8])
    assert nfe == nfe_theirs == 6 and bench.median_relative_error(theirs, ours) < 1e-6


def test_flow_oracle_quick_run(capsys: pytest.CaptureFixture[str]) -> None:
    _bench().main(["--schedule", "rectified_flow", "--quick"])
    out = capsys.readouterr().out
    assert "| unipc | exponential |" in out and "| unipc_2 | linspace_s1 |" in out and "best at NFE <= 10" in out
