"""Network parameterizations as preconditioning D = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Eq. 7 and
Table 1): eps (Ho et al. 2020), v (Salimans & Ho 2022), x0, EDM and the rectified-flow velocity (Esser et al. 2024),
each in VE form for samplers and VP form for training, plus exact eps / x0 / v conversions in VP form
(x = alpha x0 + sigma eps, v = alpha eps - sigma x0)."""

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from ldm.diffusion.schedules import NoiseSchedule, logsnr_from_sigma

# (c_in * x, c_noise, cond) -> raw output F. `cond` is whatever the network reads (a backbone's Conditioning); this
# module passes it through untouched.
ModelFn = Callable[[Tensor, Tensor, Any], Tensor]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against (B, C, H, W)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


# ---------------------------------------------------------------------------------------------------------------------
# Conversions between predictions, VP form. Each is exact where the answer is determined: at SNR = 0 (alpha = 0)
# x0 cannot come from eps, and at SNR = inf (sigma = 0) eps cannot come from x0; v determines both at every SNR.


def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x - alpha * x0) / sigma


def x0_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * x - sigma * v


def eps_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * x + alpha * v


def v_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (eps - sigma * x) / alpha


def v_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (alpha * x - x0) / sigma


# ---------------------------------------------------------------------------------------------------------------------
# Parameterizations. VE form acts on x = x0 + sigma eps; VP form on x = alpha x0 + sigma eps (= alpha * x_ve), so
# c_skip_vp = c_skip / alpha, c_in_vp = c_in / alpha and c_out is shared. Training uses VP form: it stays finite at
# SNR = 0, where the VE sigma is inf.


class Parameterization:
    """c_skip, c_out, c_in, c_noise of one network parameterization (Karras et al. 2022, Table 1).

    Args:
        schedule: for models trained on a schedule's timesteps (DDPM), c_noise = schedule.sigma_to_t(sigma);
            None gives EDM's c_noise = ln(sigma) / 4, which is infinite at SNR = 0.
    """

    def __init__(self, schedule: NoiseSchedule | None = None):
        self.schedule = schedule

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """VE sigma -> (c_skip, c_out, c_in, c_noise)."""
        return *self.scalings(sigma), self.c_noise(logsnr_from_sigma(sigma))

    def c_noise(self, logsnr: Tensor) -> Tensor:
        """The network's noise-level input, from log-SNR (= -2 ln sigma)."""
        if self.schedule is not None:
            return self.schedule.t_from_logsnr(logsnr)
        return -logsnr / 8  # ln(sigma) / 4

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """VE sigma -> (c_skip, c_out, c_in), Table 1."""
        raise NotImplementedError

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """VP (alpha, sigma) -> (c_skip, c_out, c_in) acting on x = alpha x0 + sigma eps."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """What F should output: (x0 - c_skip x) / c_out, written so it stays finite at both ends."""
        raise NotImplementedError

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        """ln c_out^2 as a function of log-SNR: the x0-space MSE is c_out^2 times the F-space MSE."""
        raise NotImplementedError


class EpsPrediction(Parameterization):
    """F predicts eps (Ho et al. 2020): D = (x - sigma F) / alpha; undefined at SNR = 0."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return 1 / alpha, -sigma / alpha, torch.ones_like(alpha)

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        return -logsnr  # c_out^2 = sigma_ve^2 = 1 / SNR


class VPrediction(Parameterization):
    """F predicts v = alpha eps - sigma x0 (Salimans & Ho 2022): D = alpha x - sigma F, finite at every SNR."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1).sqrt()

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return alpha, -sigma, torch.ones_like(alpha)

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * eps - sigma * x0

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        return -softplus(logsnr)  # c_out^2 = sigma_vp^2 = 1 / (1 + SNR)


class X0Prediction(Parameterization):
    """F predicts x0 directly: D = F."""

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros_like(sigma), torch.ones_like(sigma), 1 / (sigma**2 + 1).sqrt()

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.zeros_like(alpha), torch.ones_like(alpha), torch.ones_like(alpha)

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        return torch.zeros_like(logsnr)


class EDMPrecond(Parameterization):
    """EDM preconditioning (Karras et al. 2022, Table 1) for data of standard deviation sigma_data."""

    def __init__(self, sigma_data: float = 0.5, schedule: NoiseSchedule | None = None):
        super().__init__(schedule)
        self.sigma_data = sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        s = (sigma**2 + alpha**2 * sd**2).sqrt()  # = alpha * sqrt(sigma_ve^2 + sigma_data^2)
        return alpha * sd**2 / s**2, sigma * sd / s, 1 / s

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        sd = self.sigma_data
        return (sigma * x0 - alpha * sd**2 * eps) / (sd * (sigma**2 + alpha**2 * sd**2).sqrt())

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        log_sd2 = 2 * math.log(self.sigma_data)
        return log_sd2 - softplus(logsnr + log_sd2)  # c_out^2 = sigma_data^2 / (1 + SNR sigma_data^2)


class FlowPrediction(Parameterization):
    """F predicts the rectified-flow velocity eps - x0 from x_t = (1 - t) x0 + t eps (Liu et al. 2022; Esser et al.
    2024): D = x_t - t F. With t = sigma / (1 + sigma) and x_t = x / (1 + sigma) in VE form, and x_t = x / (alpha +
    sigma) in VP form (t = sigma / (alpha + sigma)); finite at every SNR, 0 and inf included.

    Args:
        timestep_scale: c_noise = t * timestep_scale, t the actual (shifted) noise level; 1000 is SD3's and Flux's
            timestep, 1 the bare t.
    """

    def __init__(self, timestep_scale: float = 1000.0):
        super().__init__(None)
        self.timestep_scale = timestep_scale

    def c_noise(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-logsnr / 2) * self.timestep_scale  # t = 1 / (1 + sqrt(SNR))

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)  # 1 - t; 0 at sigma = inf
        return c_in, -1 / (1 + 1 / sigma), c_in  # c_out = -t, written to be -1 at sigma = inf and 0 at 0

    def scalings_vp(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (alpha + sigma)  # alpha + sigma >= 1 on the VP circle
        return c_in, -sigma * c_in, c_in

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return eps - x0

    def log_c_out_squared(self, logsnr: Tensor) -> Tensor:
        return -2 * softplus(logsnr / 2)  # c_out^2 = t^2 = sigmoid(-logsnr / 2)^2


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser D(x, sigma) that samplers see (VE form, the k-diffusion / EDM currency).


def denoise(
    model_fn: ModelFn,
    parameterization: Parameterization,
    x: Tensor,
    sigma: Tensor,
    cond: Any = None,
) -> Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond) (Karras et al. 2022, Eq. 7); sigma is VE, (B,)."""
    c_skip, c_out, c_in, c_noise = parameterization(sigma)
    c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
    return c_skip * x + c_out * model_fn(c_in * x, c_noise, cond)


class Denoiser(nn.Module):
    """Wraps a raw network F(x, c_noise, cond) as D(x, sigma, cond) -> denoised."""

    def __init__(self, model: ModelFn, parameterization: Parameterization):
        super().__init__()
        self.model = model  # registered as a submodule when it is an nn.Module
        self.parameterization = parameterization

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        return denoise(self.model, self.parameterization, x, sigma, cond)
