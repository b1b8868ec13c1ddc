"""What a sampler does to Gaussian data, in closed form: the check behind the pipeline's warning on poor sampler x
ladder combinations and behind the stochastic samplers' variance tests.

On data N(0, v) the exact denoiser is linear, D(x, sigma) = x v / (v + sigma^2), so every sampler here (multistep
and stochastic ones included) is a linear recursion in the starting noise and its fresh draws: the output is
sum_j c_j xi_j over independent standard normals xi_j. Running the sampler once on coefficient vectors (the start
noise is e_0, the k-th fresh draw is e_k) gives every c_j, hence the exact output variance sum_j c_j^2, without
Monte Carlo error. The exact process from x = sigma_0 n (the probability-flow ODE or the reverse SDE with the true
score) ends with variance v sigma_0^2 / (v + sigma_0^2) (v when sigma_0 = inf), so the ratio of the two says how
much of the data's variance a sampler keeps: < 1 smooth, washed-out samples, > 1 leftover noise or divergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ldm.diffusion.samplers import get_sampler, sample_from_noise

STOCHASTIC_SAMPLERS = ("euler_ancestral", "ddpm", "dpmpp_2m_sde")  # draw fresh noise at every step
VARIANCE_TOLERANCE = 0.05  # a ratio outside 1 +- this is worth a warning


class _UnitNoise:
    """A noise source for the samplers that hands out e_1, e_2, ... (coefficient vectors of fresh draws)."""

    def __init__(self, size: int):
        self.size, self.next = size, 1

    def __call__(self, x: Tensor) -> Tensor:
        if self.next >= self.size:
            raise RuntimeError(f"the sampler drew more than {self.size - 1} noise tensors")
        e = torch.zeros_like(x)
        e[..., self.next] = 1.0
        self.next += 1
        return e


def gaussian_variance_ratio(sampler: str, sigmas: Tensor, data_variance: float = 1.0, **options) -> float:
    """Output variance of `sampler` on the ladder `sigmas` (from sigma = inf allowed) for data N(0, data_variance),
    over the exact process's, computed exactly (see the module docstring). `options` go to the sampler (eta, ...)."""
    v = float(data_variance)
    sigmas = sigmas.detach().to("cpu", torch.float64)
    size = 2 + 2 * len(sigmas)  # the start noise, then at most two draws per step
    noise = torch.zeros(1, size, dtype=torch.float64)
    noise[0, 0] = 1.0

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return x * (v / (v + sigma.to(x.dtype)[:, None] ** 2))

    out = sample_from_noise(get_sampler(sampler), denoiser, noise, sigmas, generator=_UnitNoise(size), **options)
    variance = out.square().sum().item()
    sigma_0 = sigmas[0].item()
    exact = v if math.isinf(sigma_0) else v * sigma_0**2 / (v + sigma_0**2)
    return variance / exact if math.isfinite(variance) else math.inf


def sampling_warning(sampler: str, spacing: str, steps: int, ladder: Callable[[str, int], Tensor], *,
                     alternatives: Iterable[tuple[str, str]], **options) -> str | None:
    """A warning when `sampler` on `ladder(spacing, steps)` keeps a unit Gaussian's variance off by more than
    VARIANCE_TOLERANCE, else None. It names the best of `alternatives` ((sampler, spacing) pairs at the same steps,
    without `options`) when that one is within the tolerance, else the number of steps that brings this one there."""
    ratio = gaussian_variance_ratio(sampler, ladder(spacing, steps), **options)
    if abs(ratio - 1) <= VARIANCE_TOLERANCE:
        return None
    effect = "smooth, washed-out" if ratio < 1 else "noisy or diverging"
    kept = f"{ratio:.0%}" if ratio < 100 else "over 100x"
    message = (f"sampler={sampler} spacing={spacing} with {steps} steps keeps {kept} of the variance of unit Gaussian "
               f"data (exact: 100%), so expect {effect} images; ")
    best_ratio, best_sampler, best_spacing = min(
        ((gaussian_variance_ratio(s, ladder(p, steps)), s, p) for s, p in alternatives), key=lambda t: abs(t[0] - 1))
    if abs(best_ratio - 1) <= VARIANCE_TOLERANCE:
        return message + f"sampler={best_sampler} spacing={best_spacing} keeps {best_ratio:.0%} at the same steps."
    more = steps
    while more < 1000:
        more *= 2
        if abs(gaussian_variance_ratio(sampler, ladder(spacing, more), **options) - 1) <= VARIANCE_TOLERANCE:
            return message + f"no ladder keeps it within {VARIANCE_TOLERANCE:.0%} at {steps} steps; {more} steps do."
    return message + "no ladder or step count up to 1000 fixes it; use another sampler."
