"""Sampling ladders for discrete (DDPM) schedules: diffusers' `leading` / `trailing` / `linspace` timestep spacings
(Lin et al. 2023, Table 2), Karras sigmas (Karras et al. 2022, Eq. 5) or sigmas uniform in log-SNR (Lu et al. 2022),
returned as descending VE sigmas ending in 0; for continuous schedules (rectified flow's t from 1 to 0 included) the
same by `sampling_sigmas`.

Zero terminal SNR: the last training step has sigma = inf, and x = noise * inf cannot be sampled. We replace it by
`ZERO_SNR_SIGMA` = sqrt((1 - 2^-24) / 2^-24) ~ 4096, the value diffusers uses (it sets alpha_bar[-1] = 2^-24), so
ladders match diffusers' schedulers exactly. At that sigma the signal is 2^-12 of the VP input, a v-prediction
denoiser differs from its SNR = 0 limit by O(sigma^-2), a first step to sigma_1 differs from the exact SNR = 0 step by
O(sigma_1 / 4096), and x = noise * sigma stays inside fp16's range. DiscreteSchedule.sigma_to_t maps the stand-in to
t = T - 1, so a timestep-conditioned Denoiser sees the zero-SNR step there, as in diffusers.
"""

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from ldm.diffusion.schedules import DiscreteSchedule, NoiseSchedule, sigmas_karras

Spacing = Literal["leading", "trailing", "linspace"]  # timestep spacings
# spaced in sigma between the schedule's ends; the capped ones start their spacing at a cap below a large sigma_max
SigmaSpacing = Literal["karras", "exponential", "exponential_capped", "karras_capped"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
SIGMA_SPACINGS: tuple[str, ...] = get_args(SigmaSpacing)
ZERO_SNR_SIGMA: float = (2.0**24 - 1) ** 0.5  # VE sigma at alpha_bar = 2^-24


def finite_sigmas(sigmas: Tensor, max_sigma: float = ZERO_SNR_SIGMA) -> Tensor:
    """Replace infinite sigmas (SNR = 0) by max_sigma; see the module docstring for why ZERO_SNR_SIGMA."""
    return torch.where(torch.isinf(sigmas), torch.full_like(sigmas, max_sigma), sigmas)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n float64 sigmas from sigma_max down to sigma_min, uniform in ln(sigma) = -log-SNR / 2 (DPM-Solver's "logSNR"
    steps, Lu et al. 2022, arXiv:2206.00927), then 0: diffusers' `use_exponential_sigmas` (DPM-Solver's
    `use_lu_lambdas` gives the same ladder)."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (n + 1,)


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


# the capped ladders' spacing starts at sigma_cap = CAP_STEPS[spacing] * n (chosen on bench/samplers.py --family)
CAP_STEPS: dict[str, float] = {"exponential_capped": 0.5, "karras_capped": 2.0}


def sigmas_capped(spacing: str, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n float64 sigmas, then 0: "exponential" (uniform in ln sigma) or "karras" spacing from sigma_min up to sigma_cap
    = CAP_STEPS[spacing] n, after one first step from sigma_max (inf allowed: pure noise) down to sigma_cap when
    sigma_max is above it; the plain spacing otherwise. Above sigma_cap the data is ~1/sigma_cap^2 of x's variance and
    D barely moves, yet an even log-sigma ladder up to cosine's 2e4 or zero-SNR's 4096 spent a third of its steps
    there; one exponential-integrator step covers that range with an error of O(Var(data) / sigma_cap^2) relative,
    shrinking with n as the solver's own error does. Caps from 0.25 n to 5 n were compared on bench/samplers.py's
    mixture family."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    kind = spacing.removesuffix("_capped")
    cap = CAP_STEPS[spacing] * n
    if sigma_max <= cap or n == 1:
        if not math.isfinite(sigma_max):
            return torch.tensor([math.inf, 0.0], dtype=torch.float64)
        return _sigma_spaced(kind, n, sigma_min, sigma_max, rho)
    first = torch.tensor([sigma_max], dtype=torch.float64)
    return torch.cat([first, _sigma_spaced(kind, n - 1, sigma_min, max(cap, sigma_min), rho)])


def _sigma_spaced(spacing: SigmaSpacing, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if spacing == "karras":
        return sigmas_karras(n, sigma_min, sigma_max, rho).to(torch.float64)
    if spacing in CAP_STEPS:
        return sigmas_capped(spacing, n, sigma_min, sigma_max, rho)
    return sigmas_exponential(n, sigma_min, sigma_max)


def discrete_sigmas(
    schedule: DiscreteSchedule,
    n: int,
    spacing: Spacing | SigmaSpacing = "leading",
    *,
    steps_offset: int = 0,
    rho: float = 7.0,
    max_sigma: float = ZERO_SNR_SIGMA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(n + 1,) descending VE sigmas ending in 0: a timestep spacing, or one in sigma between the schedule's sigma_min
    and (finite) sigma_max: "karras" (Karras et al. 2022, Eq. 5, with rho) or "exponential" (uniform in log-SNR,
    `sigmas_exponential`). An infinite sigma (zero terminal SNR) becomes max_sigma; ladders equal diffusers'."""
    if spacing not in SPACINGS + SIGMA_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS + SIGMA_SPACINGS}")
    table = finite_sigmas(schedule.sigmas, max_sigma)  # (T,) float64, increasing in t
    if spacing in SIGMA_SPACINGS:
        sigmas = _sigma_spaced(spacing, n, table[0].item(), table[-1].item(), rho)
    else:
        timesteps = spaced_timesteps(schedule.num_timesteps, n, spacing, steps_offset)
        sigmas = torch.cat([sigmas_at_timesteps(table, timesteps), table.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


OPEN_END_STEPS = 4.0  # sigma spacings stop 1 / (OPEN_END_STEPS n + 1) of t inside an open end (sigma 0 or inf);
# 4 against 1.5, 3 and 6 on the flow family (bench/samplers.py --family): 1.5-4x more accurate at 20-50 steps


def _open_ends(schedule: NoiseSchedule) -> tuple[bool, bool]:
    """Whether a continuous schedule reaches sigma = 0 at t_min and sigma = inf (SNR 0) at t_max (rectified flow)."""
    if schedule.discrete:
        return False, False
    low, high = schedule.t_to_sigma(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)).tolist()
    return low == 0, math.isinf(high)


def auto_spacing(schedule: NoiseSchedule, sampler: str | None = None) -> Spacing | SigmaSpacing:
    """The default ladder, for every schedule: "karras_capped" for DEIS (its few-step regime) and Heun (whose trapezoid
    diverges over a huge first step: on a unit Gaussian it keeps 2.1x the variance at 15 steps on cosine, against
    7000x on exponential_capped), "exponential_capped" (even in log-SNR below 0.5 n, one first step from sigma_max)
    for every other sampler. With `samplers.auto_sampler`'s choice (DEIS-3 below 20 steps, UniPC-3 from 20) that is
    at least as accurate as diffusers' best configuration on every shipped schedule at 10, 15, 20, 30 and 50
    evaluations (bench/samplers.py --family: 8 generated Gaussian mixtures per schedule; table in bench/RESULTS.md)."""
    del schedule  # one rule for all: the cap adapts the ladder to sigma_max, the open ends to flows
    return "karras_capped" if sampler in ("deis", "heun") else "exponential_capped"


def _continuous_sigma_spaced(schedule: NoiseSchedule, n: int, spacing: SigmaSpacing) -> Tensor:
    """`spacing` in sigma between a continuous schedule's ends. An open end moves inside by 1 / (OPEN_END_STEPS n + 1)
    of the t range (rectified flow: sigma 4 n and 1 / (4 n)); where it is SNR 0 the ladder starts at inf, one
    exact step from pure noise (samplers.sample_from_noise) before the n - 1 spaced sigmas."""
    zero_at_min, inf_at_max = _open_ends(schedule)
    dt = (schedule.t_max - schedule.t_min) / (OPEN_END_STEPS * n + 1)
    if spacing in CAP_STEPS:  # an infinite top is one more first step, from pure noise to the cap
        sigma_min = schedule.t_to_sigma(torch.tensor([schedule.t_min + dt * zero_at_min], dtype=torch.float64)).item()
        sigma_max = schedule.t_to_sigma(torch.tensor([schedule.t_max], dtype=torch.float64)).item()
        return sigmas_capped(spacing, n, sigma_min, sigma_max)
    t = torch.tensor([schedule.t_min + dt * zero_at_min, schedule.t_max - dt * inf_at_max], dtype=torch.float64)
    sigma_min, sigma_max = schedule.t_to_sigma(t).tolist()
    points = n - int(inf_at_max)
    sigmas = _sigma_spaced(spacing, points, sigma_min, sigma_max) if points else torch.zeros(1, dtype=torch.float64)
    return torch.cat([torch.full((int(inf_at_max),), math.inf, dtype=torch.float64), sigmas])  # (n + 1,)


def sampling_sigmas(
    schedule: NoiseSchedule,
    n: int,
    spacing: Spacing | SigmaSpacing | Literal["auto"] = "auto",
    *,
    sampler: str | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n + 1,) descending VE sigmas ending in 0 for any schedule: `discrete_sigmas` for DDPM schedules (finite: a
    zero terminal SNR becomes diffusers' stand-in); for continuous ones "karras" or "exponential" between the
    schedule's ends (`_continuous_sigma_spaced`), or (any other spacing) t evenly spaced, the schedule's own
    get_sigmas. A continuous schedule that reaches SNR 0 (rectified flow's t = 1) gives a ladder from sigma = inf:
    run it with `samplers.sample_from_noise`, which takes that first step exactly. "auto" picks by `auto_spacing`
    for `sampler`."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    if spacing == "auto":
        spacing = auto_spacing(schedule, sampler)
    if schedule.discrete:
        return discrete_sigmas(schedule, n, spacing, device=device)
    if spacing in SIGMA_SPACINGS:
        return _continuous_sigma_spaced(schedule, n, spacing).to(device=device, dtype=torch.float32)
    return schedule.get_sigmas(n).to(device=device, dtype=torch.float32)


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of an (n + 1,) ladder that img2img runs: the last int(n * strength) steps, as diffusers'
    img2img pipelines (strength 1 keeps the whole ladder, i.e. starts from pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(sigmas) - 1
    keep = min(n, int(n * strength))
    if keep < 1:
        raise ValueError(f"strength {strength} with {n} steps leaves no step to run; raise steps or strength "
                         f"(at least {1 / n:.3g}).")
    return sigmas[n - keep:]
