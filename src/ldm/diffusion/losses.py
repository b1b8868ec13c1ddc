"""DenoisingLoss: lambda(SNR) c_out^2 ||F(c_in x, c_noise) - F_target||^2 (Karras et al. 2022, Eq. 8), computed in VP
form so that a zero terminal SNR (Lin et al. 2023) never puts an infinite VE sigma into the arithmetic."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ldm.diffusion.noise_levels import NoiseLevelSampler, UniformTimesteps, offset_noise, perturb_noise
from ldm.diffusion.parameterization import ModelFn, Parameterization, append_dims
from ldm.diffusion.schedules import NoiseSchedule, sigma_from_logsnr
from ldm.diffusion.weighting import Uniform, Weighting


class LossOutput(NamedTuple):
    loss: Tensor  # (B,) weighted per-sample loss, to be reduced by the caller
    t: Tensor  # (B,) schedule time of each sample
    logsnr: Tensor  # (B,) -inf at a zero terminal SNR

    @property
    def snr(self) -> Tensor:
        return self.logsnr.exp()

    @property
    def sigma(self) -> Tensor:
        """VE sigma (inf at a zero terminal SNR): for logging only."""
        return sigma_from_logsnr(self.logsnr)


class DenoisingLoss:
    """Per-sample denoising loss, weighted in x0 space by `weighting` and computed on the network output F.

    Args:
        schedule, parameterization: the process's; a training module leaves them out of the config and binds its
            `DiffusionProcess`'s parts (`bind`), so there is one process object, and passes the schedule at the
            latents' size to each call (a resolution-dependent shift).
        offset_noise: strength of per-channel offset noise added to eps (Guttenberg 2023 uses 0.1).
        input_perturbation: gamma of DDPM-IP (Ning et al. 2023 use 0.1): x_t uses eps + gamma N(0, I), the target eps.
    """

    def __init__(
        self,
        schedule: NoiseSchedule | None = None,
        parameterization: Parameterization | None = None,
        weighting: Weighting | None = None,
        noise_levels: NoiseLevelSampler | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
    ):
        self.weighting = weighting if weighting is not None else Uniform()
        self.noise_levels = noise_levels if noise_levels is not None else UniformTimesteps()
        self.offset_noise = offset_noise
        self.input_perturbation = input_perturbation
        self.schedule: NoiseSchedule | None = None
        self.parameterization: Parameterization | None = None
        if schedule is not None or parameterization is not None:
            if schedule is None or parameterization is None:
                raise ValueError("DenoisingLoss needs both schedule and parameterization, or neither (bind them later)")
            self.bind(schedule, parameterization)

    def bind(self, schedule: NoiseSchedule, parameterization: Parameterization) -> DenoisingLoss:
        """Use this process's schedule and parameterization; refuses combinations that are not finite at its ends."""
        self.schedule, self.parameterization = schedule, parameterization
        self._check_finite_at_ends()
        return self

    def __call__(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        cond: Any = None,
        *,
        generator: torch.Generator | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> LossOutput:
        """`schedule`: the process's schedule at these latents' size (default: the bound one, unshifted)."""
        if self.parameterization is None or self.schedule is None:
            raise ValueError("DenoisingLoss has no schedule and parameterization yet: pass them or call bind()")
        level = self.noise_levels(schedule or self.schedule, x0.shape[0], device=x0.device, generator=generator)
        alpha, sigma = (append_dims(c, x0.ndim) for c in (level.alpha, level.sigma))  # (B, 1, 1, 1), VP
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        eps = offset_noise(noise, self.offset_noise, generator)  # (B, C, H, W), also the target's noise
        x = alpha * x0 + sigma * perturb_noise(eps, self.input_perturbation, generator)  # (B, C, H, W)
        c_in = self.parameterization.scalings_vp(alpha, sigma)[2]
        output = model_fn(c_in * x, self.parameterization.c_noise(level.logsnr), cond)
        target = self.parameterization.target(x0, eps, alpha, sigma)
        weight = self.weighting(level.logsnr, self.parameterization)  # (B,) lambda * c_out^2
        loss = weight * (output.float() - target.float()).pow(2).flatten(1).mean(1)
        return LossOutput(loss, level.t, level.logsnr)

    def _check_finite_at_ends(self) -> None:
        # e.g. eps-prediction with a zero terminal SNR: x0 = (x - sigma eps) / alpha has no finite weight at alpha = 0
        t = torch.tensor([self.schedule.t_min, self.schedule.t_max])
        logsnr = self.schedule.logsnr(t)
        weight = self.weighting(logsnr, self.parameterization)
        c_noise = self.parameterization.c_noise(logsnr)
        if not (weight.isfinite().all() and c_noise.isfinite().all()):
            raise ValueError(
                f"{type(self.weighting).__name__} with {type(self.parameterization).__name__} on "
                f"{type(self.schedule).__name__} is not finite at the schedule's ends (log-SNR {logsnr.tolist()}): "
                f"weight {weight.tolist()}, c_noise {c_noise.tolist()}. Expected a finite weight and c_noise; at "
                f"SNR = 0 use VPrediction (or a weighting that vanishes there, e.g. MinSNR) and pass schedule= to "
                f"the parameterization so c_noise is a timestep rather than ln(sigma) / 4."
            )
