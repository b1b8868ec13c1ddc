"""Training-time noise levels: uniform timesteps (Ho et al. 2020), SD3's logit-normal, mode and cosmap densities of t
(Esser et al. 2024, Sec. 3.1) and log-normal sigma (Karras et al. 2022, Sec. 5), in VP form; plus offset noise
(Guttenberg 2023) and input perturbation (Ning et al. 2023)."""

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule, vp_from_logsnr


class NoiseLevel(NamedTuple):
    t: Tensor  # (B,) schedule time: a step index (long) for discrete schedules drawn by step, else float
    logsnr: Tensor  # (B,) -inf at a zero terminal SNR
    alpha: Tensor  # (B,) VP signal scale
    sigma: Tensor  # (B,) VP noise scale, alpha**2 + sigma**2 = 1


class NoiseLevelSampler(Protocol):
    """What DenoisingLoss calls: (schedule, batch_size, device=, generator=) -> NoiseLevel."""

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel: ...


def noise_level_at(schedule: NoiseSchedule, t: Tensor) -> NoiseLevel:
    """The NoiseLevel of a schedule at times t."""
    logsnr = schedule.logsnr(t)
    return NoiseLevel(t, logsnr, *vp_from_logsnr(logsnr))


def _time_from_unit(schedule: NoiseSchedule, u: Tensor) -> Tensor:
    # u in [0, 1) -> schedule time: step floor(u T) (as diffusers' SD3 script), or t_min + u (t_max - t_min)
    if schedule.discrete:
        return (u * (schedule.t_max + 1)).long().clamp(max=schedule.t_max)
    return schedule.t_min + u * (schedule.t_max - schedule.t_min)


class UniformTimesteps:
    """t ~ U{0, ..., T - 1} for discrete schedules (Ho et al. 2020, Alg. 1), t ~ U[t_min, t_max) otherwise."""

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel:
        u = torch.rand(batch_size, device=device, generator=generator)
        return noise_level_at(schedule, _time_from_unit(schedule, u))


class LogitNormalTimesteps:
    """t = sigmoid(n), n ~ N(mean, std), mapped onto the schedule's time (Esser et al. 2024, SD3: mean 0, std 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel:
        n = torch.randn(batch_size, device=device, generator=generator)
        return noise_level_at(schedule, _time_from_unit(schedule, torch.sigmoid(self.mean + self.std * n)))


class ModeTimesteps:
    """t = f_mode(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1] (Esser et al. 2024, Sec. 3.1, "mode sampling
    with heavy tails"): scale > 0 favours mid-range t, < 0 the ends, 0 is uniform; SD3's best was 1.29."""

    def __init__(self, scale: float = 1.29):
        if not -1 <= scale <= 2 / (math.pi - 2):  # where f_mode is monotone, so a density on [0, 1]
            raise ValueError(f"mode scale must be in [-1, {2 / (math.pi - 2):.4f}], got {scale}")
        self.scale = scale

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel:
        u = torch.rand(batch_size, device=device, generator=generator)
        t = 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return noise_level_at(schedule, _time_from_unit(schedule, t.clamp(0, 1)))


class CosMapTimesteps:
    """t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U[0, 1] (Esser et al. 2024, Sec. 3.1, "CosMap"): the cosine schedule's
    log-SNR density carried over to rectified flow."""

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel:
        u = torch.rand(batch_size, device=device, generator=generator)
        t = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
        return noise_level_at(schedule, _time_from_unit(schedule, t.clamp(0, 1)))


class LogNormalSigmas:
    """ln sigma ~ N(p_mean, p_std) for the VE sigma (Karras et al. 2022, Table 1); t is the schedule's t(sigma)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(
        self,
        schedule: NoiseSchedule,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> NoiseLevel:
        log_sigma = self.p_mean + self.p_std * torch.randn(batch_size, device=device, generator=generator)
        logsnr = -2 * log_sigma
        return NoiseLevel(schedule.t_from_logsnr(logsnr), logsnr, *vp_from_logsnr(logsnr))


def offset_noise(eps: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """eps + strength * N(0, 1) drawn once per (B, C), shared over the spatial dims (Guttenberg 2023)."""
    if strength == 0:
        return eps
    shape = eps.shape[:2] + (1,) * (eps.ndim - 2)  # (B, C, 1, 1)
    return eps + strength * torch.randn(shape, device=eps.device, dtype=eps.dtype, generator=generator)


def perturb_noise(eps: Tensor, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """eps + gamma * N(0, I), the noise that builds x_t while the target keeps eps (Ning et al. 2023, DDPM-IP)."""
    if gamma == 0:
        return eps
    return eps + gamma * torch.randn(eps.shape, device=eps.device, dtype=eps.dtype, generator=generator)
