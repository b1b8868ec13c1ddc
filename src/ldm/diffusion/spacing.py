"""Sampling ladders for discrete (DDPM) schedules: diffusers' `leading` / `trailing` / `linspace` timestep spacings
(Lin et al. 2023, Table 2) or Karras sigmas (Karras et al. 2022, Eq. 5), returned as descending VE sigmas ending in 0.

Zero terminal SNR: the last training step has sigma = inf, and x = noise * inf cannot be sampled. We replace it by
`ZERO_SNR_SIGMA` = sqrt((1 - 2^-24) / 2^-24) ~ 4096, the value diffusers uses (it sets alpha_bar[-1] = 2^-24), so
ladders match diffusers' schedulers exactly. At that sigma the signal is 2^-12 of the VP input, a v-prediction
denoiser differs from its SNR = 0 limit by O(sigma^-2), a first step to sigma_1 differs from the exact SNR = 0 step by
O(sigma_1 / 4096), and x = noise * sigma stays inside fp16's range. Caveat: DiscreteSchedule.sigma_to_t maps any
finite sigma above the last finite knot to t = T - 2, so a timestep-conditioned Denoiser sees T - 2 at that first step.
"""

from typing import Literal, get_args

import torch
from torch import Tensor

from ldm.diffusion.schedules import DiscreteSchedule, sigmas_karras

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
ZERO_SNR_SIGMA: float = (2.0**24 - 1) ** 0.5  # VE sigma at alpha_bar = 2^-24


def finite_sigmas(sigmas: Tensor, max_sigma: float = ZERO_SNR_SIGMA) -> Tensor:
    """Replace infinite sigmas (SNR = 0) by max_sigma; see the module docstring for why ZERO_SNR_SIGMA."""
    return torch.where(torch.isinf(sigmas), torch.full_like(sigmas, max_sigma), sigmas)


def spaced_timesteps(num_timesteps: int, n: int, spacing: Spacing = "leading", steps_offset: int = 0) -> Tensor:
    """n descending (possibly fractional) timesteps in [0, T - 1], as diffusers' Euler/DDIM `timestep_spacing`.

    Args:
        spacing: "leading" (k * (T // n) + steps_offset, SD 1.x), "trailing" (T - 1 down by T / n, needed to reach
            the zero-SNR step) or "linspace" (evenly from T - 1 to 0, fractional; diffusers' DPM-Solver variant
            instead takes n of n + 1 points, so pass its timesteps explicitly if you need that one).
    """
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if spacing == "linspace":
        t = torch.linspace(0, num_timesteps - 1, n, dtype=torch.float64)
    elif spacing == "leading":
        t = (torch.arange(n, dtype=torch.float64) * (num_timesteps // n)).round() + steps_offset
    elif spacing == "trailing":
        t = (torch.arange(num_timesteps, 0, -num_timesteps / n, dtype=torch.float64).round() - 1).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return t.flip(0).clamp(0, num_timesteps - 1)


def sigmas_at_timesteps(table: Tensor, timesteps: Tensor) -> Tensor:
    """VE sigma at fractional timesteps, linear in sigma between the (T,) table's knots (diffusers' np.interp)."""
    low = timesteps.floor().long().clamp(0, len(table) - 2)
    w = timesteps - low
    return table[low] + w * (table[low + 1] - table[low])


def discrete_sigmas(
    schedule: DiscreteSchedule,
    n: int,
    spacing: Spacing | Literal["karras"] = "leading",
    *,
    steps_offset: int = 0,
    rho: float = 7.0,
    max_sigma: float = ZERO_SNR_SIGMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(n + 1,) descending VE sigmas ending in 0: a timestep spacing, or "karras" (Karras et al. 2022, Eq. 5) between
    the schedule's sigma_min and (finite) sigma_max. An infinite sigma (zero terminal SNR) becomes max_sigma."""
    table = finite_sigmas(schedule.sigmas, max_sigma)  # (T,) float64, increasing in t
    if spacing == "karras":
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        sigmas = sigmas_karras(n, table[0].item(), table[-1].item(), rho).to(torch.float64)
    else:
        timesteps = spaced_timesteps(schedule.num_timesteps, n, spacing, steps_offset)
        sigmas = torch.cat([sigmas_at_timesteps(table, timesteps), table.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)
