"""Sampler accuracy against an exact oracle: our samplers and diffusers' schedulers on a Gaussian mixture whose
posterior mean D(x, sigma) is closed-form, measured against the probability-flow ODE solved by scipy at tight
tolerance (EDM's analytic-mixture test idea, Karras et al. 2022), at equal model evaluations (NFE).

Data: K components N(mu_k, diag(s_k^2)) in `--dim` dimensions, rescaled so the per-dimension variance averages 1
(latent scale). Every noisy marginal p_sigma is again a mixture, with variances s_k^2 + sigma^2, so D and the score
are exact (responsibilities by log-sum-exp, then per-component shrinkage) and the only error left is the sampler's.

Reference, per starting noise n: x(sigma_max) = n * sigma_max, with sigma_max and sigma_min the largest and smallest
sigma of the discrete schedule (T = 1000); the ODE dx/d ln(sigma) = x - D(x, sigma) is integrated by DOP853 down to
sigma_min, then denoised once: x_ref = D(x(sigma_min), sigma_min). Every sampler ends the same way (its last step to
sigma = 0 returns D at its last nonzero sigma), and a model trained on the schedule cannot be asked below sigma_min,
so x_ref is what any sampler converges to as NFE grows; integrating on to sigma = 0 instead differs by the printed
"sigma_min floor". A ladder that starts below sigma_max (`leading`) or ends above sigma_min (`trailing` at few
steps) is measured against the same x_ref, so its truncation counts as error, as it does for the images.

Error: ||x - x_ref|| / ||x_ref|| per sample, median over samples. Deterministic samplers (euler, heun, ddim with
eta = 0, dpmpp_2m, unipc) are compared per sample; stochastic ones have no per-sample reference, so their table gives a
distribution statistic instead: E[z^2] with z = (x - mu_k) / s_k for the most likely component k (1 for exact draws;
< 1 over-smoothed, > 1 leftover noise). diffusers runs the same algorithm with the same spacing name, started from
the same x = n * sigmas[0] (VP schedulers get x / sqrt(1 + sigma^2)), with an eps-prediction model built from the
same D, evaluated at the exact sigma each scheduler steps from. NFE counts denoiser calls: Heun takes 2n - 1 for n
steps, so its budget rounds down to the nearest odd number (9, 19, 49).

Spacings: our `discrete_sigmas` ones (leading with SD's steps_offset = 1, trailing, linspace, karras, and
exponential, uniform in log-SNR: diffusers' use_exponential_sigmas). Where diffusers defines a spacing differently
(DPM-Solver's and UniPC's leading/linspace take n of n + 1 points; DDIM's linspace rounds the timesteps but still steps
to t - T // n), the ratio is not 1 and measures the two definitions. Our unipc (UniPC-3 by default, bh2) runs against
diffusers' UniPCMultistepScheduler(solver_type="bh2", solver_order=3), our dpmpp_3m against DPMSolverMultistepScheduler
(solver_order=3, DPM-Solver++ 3M); diffusers' default UniPC-2 joins as a diffusers-only row, so that "best diffusers
configuration" means what it says. A cell reads "fails" where diffusers raises (its multistep solvers on repeated
rounded timesteps, e.g. cosine + karras).

Rectified flow (--schedule rectified_flow): x_t = (1 - t) x0 + t eps from pure noise at t = 1; the reference is the
velocity ODE E[eps - x0 | x_t], smooth on [0, 1], integrated to t = 0 (no sigma_min floor); ours run through
sample_from_noise (exact first step from sigma = inf), diffusers' FlowMatchEuler/Heun and its multistep solvers with
use_flow_sigmas get the exact velocity; --sweep averages (geometrically) over five mixtures of other sizes and seeds.

    python bench/samplers.py                                  # scaled_linear, 256 samples, NFE 5 10 20 50
    python bench/samplers.py --schedule cosine --nfe 10 20
    python bench/samplers.py --schedule rectified_flow --sweep --nfe 10 20 30 50 --open-end-steps 1 2 3
    python bench/samplers.py --quick                          # smoke test, a few seconds
    python bench/samplers.py --family --mixtures 8            # the default vs diffusers' best, every schedule (~20 min)
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from scipy.integrate import solve_ivp
from torch import Tensor

from ldm.diffusion import spacing as spacing_module
from ldm.diffusion.samplers import SAMPLERS, auto_sampler, get_sampler, sample_from_noise
from ldm.diffusion.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    KarrasSchedule,
    LinearSchedule,
    RectifiedFlow,
    ScaledLinearSchedule,
    ShiftedCosineSchedule,
    SigmoidSchedule,
)
from ldm.diffusion.shift import TimestepShift
from ldm.diffusion.spacing import OPEN_END_STEPS, SIGMA_SPACINGS, discrete_sigmas, sampling_sigmas
from ldm.diffusion.spacing import SPACINGS as TIMESTEP_SPACINGS

SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS  # leading, trailing, linspace, karras, exponential
DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc")
DIFFUSERS_ONLY: tuple[str, ...] = ("unipc_2",)  # diffusers' configurations without an "ours" row (its default UniPC)
STOCHASTIC = ("euler_ancestral", "ddpm", "dpmpp_2m_sde")
LEADING_OFFSET = 1  # Stable Diffusion's steps_offset, on both sides
# schedule name -> (our schedule, diffusers' beta arguments)
SCHEDULES: dict[str, tuple[Callable[[], DiscreteSchedule], dict]] = {
    "scaled_linear": (ScaledLinearSchedule,
                      {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    "cosine": (CosineSchedule, {"beta_schedule": "squaredcos_cap_v2"}),
}
# diffusers' scheduler for each sampler (eps prediction); a spacing it lacks (e.g. DDIM + karras) shows as n/a
DIFFUSERS = {
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "ddim": partial(DDIMScheduler, clip_sample=False, set_alpha_to_one=True),
    "ddpm": partial(DDPMScheduler, clip_sample=False, variance_type="fixed_small"),
    "dpmpp_2m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2,
                        final_sigmas_type="zero"),
    "dpmpp_2m_sde": partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2,
                            final_sigmas_type="zero"),
    "dpmpp_3m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=3,
                        final_sigmas_type="zero"),
    "unipc": partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh2", predict_x0=True,
                     lower_order_final=True, final_sigmas_type="zero"),
    "unipc_2": partial(UniPCMultistepScheduler, solver_order=2, solver_type="bh2", predict_x0=True,
                       lower_order_final=True, final_sigmas_type="zero"),
}
VE_SCHEDULERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)  # hold x = x0 + sigma n


# ---------------------------------------------------------------------------------------------------------------------
# The oracle: a diagonal Gaussian mixture, its exact denoiser and the probability-flow ODE reference.


@dataclass
class GaussianMixture:
    """sum_k w_k N(mu_k, diag(s_k^2)); its noisy marginal p_sigma has component variances s_k^2 + sigma^2."""

    means: Tensor  # (K, d)
    stds: Tensor  # (K, d)
    log_weights: Tensor  # (K,), normalized

    def _components(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x - mu_k, s_k^2 + sigma^2, ln w_k + ln N(x; mu_k, s_k^2 + sigma^2)): (B, K, d), (B|1, K, d), (B, K)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        diff = x.to(torch.float64)[:, None] - self.means  # (B, K, d)
        var = self.stds**2 + sigma**2
        log_joint = self.log_weights - 0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
        return diff, var, log_joint

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """grad_x ln p_sigma(x) = -sum_k r_k (x - mu_k) / (s_k^2 + sigma^2), float64 (B, d)."""
        diff, var, log_joint = self._components(x, sigma)
        return -(log_joint.softmax(-1)[..., None] * diff / var).sum(1)

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """E[x0 | x0 + sigma n = x] = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)), in x's dtype."""
        diff, var, log_joint = self._components(x, sigma)
        per_component = self.means + self.stds**2 / var * diff  # (B, K, d)
        return (log_joint.softmax(-1)[..., None] * per_component).sum(1).to(x.dtype)

    def flow_posterior(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for x_t = (1 - t) x0 + t eps, float64 (B, d): components N((1 - t) mu_k,
        (1 - t)^2 s_k^2 + t^2), finite on all of [0, 1] (at t = 1 the responsibilities are the weights)."""
        a, b = 1 - t, t
        diff = x.to(torch.float64)[:, None] - a * self.means  # (B, K, d)
        var = a**2 * self.stds**2 + b**2
        r = (self.log_weights - 0.5 * (diff**2 / var + var.log()).sum(-1)).softmax(-1)[..., None]
        return (r * (self.means + a * self.stds**2 / var * diff)).sum(1), (r * b / var * diff).sum(1)

    def velocity(self, x: Tensor, t: float) -> Tensor:
        """The rectified-flow velocity E[eps - x0 | x_t], in x's dtype."""
        x0, eps = self.flow_posterior(x, t)
        return (eps - x0).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n exact draws, float64 (n, d)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * noise

    def whitened_variance(self, x: Tensor) -> float:
        """E[z^2], z = (x - mu_k) / s_k for each sample's most likely component: 1 for exact draws."""
        k = self._components(x, 0.0)[2].argmax(-1)
        return (((x.to(torch.float64) - self.means[k]) / self.stds[k]) ** 2).mean().item()


def make_mixture(dim: int = 32, components: int = 8, seed: int = 0) -> GaussianMixture:
    """Random means, per-dimension stds in [0.15, 0.5] x the mean spread and uneven weights, then one common scale so
    the per-dimension variance of the data averages 1 (latents are normalized to about that)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = 0.15 + 0.35 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    log_weights = (0.5 * torch.randn(components, generator=g, dtype=torch.float64)).log_softmax(0)
    w = log_weights.exp()[:, None]
    mean = (w * means).sum(0)
    variance = (w * (stds**2 + (means - mean) ** 2)).sum(0).mean()
    scale = variance.rsqrt()
    return GaussianMixture(means * scale, stds * scale, log_weights)


def reference(mixture: GaussianMixture, noise: Tensor, sigma_max: float, sigma_min: float,
              rtol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """(x_ref, x_zero), float64 (N, d): the probability-flow ODE from noise * sigma_max solved to sigma_min and
    denoised there (what samplers converge to), and the same ODE solved on to sigma = 0 (see the module docstring)."""
    shape = noise.shape

    def drift_log_sigma(u: float, y):  # dx / d ln(sigma) = x - D = -sigma^2 score (Karras et al. 2022, Eq. 4)
        sigma = math.exp(u)
        return (-(sigma**2) * mixture.score(torch.from_numpy(y).view(shape), sigma)).flatten().numpy()

    def drift_sigma(sigma: float, y):  # dx / d sigma = -sigma score: smooth down to sigma = 0 since every s_k > 0
        return (-sigma * mixture.score(torch.from_numpy(y).view(shape), sigma)).flatten().numpy()

    def solve(f, t0: float, t1: float, y0):
        sol = solve_ivp(f, (t0, t1), y0, method="DOP853", rtol=rtol, atol=rtol, t_eval=[t1])
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return sol.y[:, -1]

    x_min = solve(drift_log_sigma, math.log(sigma_max), math.log(sigma_min), (noise * sigma_max).flatten().numpy())
    x_zero = solve(drift_sigma, sigma_min, 0.0, x_min)
    x_min, x_zero = torch.from_numpy(x_min).view(shape), torch.from_numpy(x_zero).view(shape)
    return mixture.denoise(x_min, sigma_min), x_zero


def median_relative_error(x: Tensor, x_ref: Tensor) -> float:
    """Median over samples of ||x - x_ref|| / ||x_ref||."""
    return (x.double() - x_ref).norm(dim=-1).div(x_ref.norm(dim=-1)).median().item()


# ---------------------------------------------------------------------------------------------------------------------
# The contenders, each returning (samples, NFE).


def steps_for(name: str, nfe: int) -> int:
    """Steps that spend at most `nfe` denoiser calls: Heun spends 2n - 1, the others n."""
    return max(1, (nfe + 1) // 2) if name == "heun" else nfe


def sigma_ladder(schedule: DiscreteSchedule, n: int, spacing: str) -> Tensor:
    """(n + 1,) float64 `discrete_sigmas` ladder, with SD's steps_offset for leading."""
    offset = LEADING_OFFSET if spacing == "leading" else 0
    return discrete_sigmas(schedule, n, spacing, steps_offset=offset, dtype=torch.float64)


def run_ours(name: str, mixture: GaussianMixture, noise: Tensor, sigmas: Tensor, seed: int = 1) -> tuple[Tensor, int]:
    """Our sampler from x = noise * sigmas[0], counting denoiser calls."""
    calls = 0

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return mixture.denoise(x, sigma)

    x = get_sampler(name)(denoiser, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(seed))
    return x, calls


def diffusers_scheduler(name: str, spacing: str, schedule: str):
    """diffusers' scheduler for sampler `name` with the same spacing, or None where it has no such option."""
    factory = DIFFUSERS[name]
    kwargs = {"num_train_timesteps": 1000, "prediction_type": "epsilon", **SCHEDULES[schedule][1]}
    if spacing not in ("karras", "exponential", *TIMESTEP_SPACINGS):
        return None  # exponential_capped: ours only
    if spacing in ("karras", "exponential"):
        if f"use_{spacing}_sigmas" not in inspect.signature(factory).parameters:
            return None
        kwargs[f"use_{spacing}_sigmas"] = True
    else:
        kwargs |= {"timestep_spacing": spacing, "steps_offset": LEADING_OFFSET if spacing == "leading" else 0}
    return factory(**kwargs)


def run_diffusers(scheduler, n: int, mixture: GaussianMixture, noise: Tensor, seed: int = 1) -> tuple[Tensor, int]:
    """diffusers' loop with an eps model built from D, evaluated at the sigma the scheduler steps from: sigmas[i] for
    the sigma-based schedulers (Heun's list is interleaved like its timesteps), the train-table sigma at t otherwise."""
    scheduler.set_timesteps(n)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # (T,) VE sigmas
    by_sigma = hasattr(scheduler, "sigmas")
    step_sigmas = [float(scheduler.sigmas[i]) if by_sigma else float(table[int(t)])
                   for i, t in enumerate(scheduler.timesteps)]
    x = noise * step_sigmas[0]
    if not isinstance(scheduler, VE_SCHEDULERS):  # these hold x_vp = alpha * x_ve
        x = x / math.sqrt(1 + step_sigmas[0] ** 2)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # not Heun's
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
    for t, sigma in zip(scheduler.timesteps, step_sigmas):
        x_ve = scheduler.scale_model_input(x, t) * math.sqrt(1 + sigma**2)  # every model input is x_vp
        eps = (x_ve - mixture.denoise(x_ve, sigma)) / sigma
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, len(step_sigmas)


# ---------------------------------------------------------------------------------------------------------------------
# Tables.

Results = dict[tuple[str, str], dict[int, tuple[float | None, float | None, int]]]  # (sampler, spacing) -> NFE -> row


def run_grid(names: tuple[str, ...], schedule_name: str, budgets: list[int], mixture: GaussianMixture, noise: Tensor,
             metric: Callable[[Tensor], float]) -> Results:
    """(ours, diffusers, actual NFE) of `metric` for every sampler x spacing x NFE budget; None where a side lacks the
    sampler or the spacing (a row is left out when neither has it), NaN where diffusers raises."""
    schedule = SCHEDULES[schedule_name][0]()
    results: Results = {}
    for name in names:
        for spacing in SPACINGS:
            if name not in SAMPLERS and diffusers_scheduler(name, spacing, schedule_name) is None:
                continue
            row = results.setdefault((name, spacing), {})
            for budget in budgets:
                n = steps_for(name, budget)
                ours = theirs = nfe = None
                if name in SAMPLERS:
                    x, nfe = run_ours(name, mixture, noise, sigma_ladder(schedule, n, spacing))
                    ours = metric(x)
                scheduler = diffusers_scheduler(name, spacing, schedule_name)
                if scheduler is not None:
                    try:
                        x, nfe_theirs = run_diffusers(scheduler, n, mixture, noise)
                    except (IndexError, AssertionError) as err:  # multistep solvers on repeated rounded timesteps
                        first = all(r[1] is None or not math.isnan(r[1]) for r in row.values())
                        if first:
                            print(f"diffusers {name}/{spacing} fails from {n} steps on: {type(err).__name__} {err}")
                        theirs = math.nan
                    else:
                        if nfe is not None and nfe_theirs != nfe:
                            raise RuntimeError(f"{name}/{spacing}: {nfe} calls for us, {nfe_theirs} for diffusers")
                        nfe, theirs = nfe_theirs, metric(x)
                row[budget] = (ours, theirs, nfe)
    return results


def format_table(results: Results, budgets: list[int], ratio: bool) -> str:
    """Markdown: rows sampler + spacing, columns NFE budget, cells "ours / diffusers (ours/diffusers)"."""
    lines = ["| sampler | spacing | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in budgets) + " |"]
    for (name, spacing), row in results.items():
        cells = []
        for b in budgets:
            ours, theirs, nfe = row[b]
            fmt = "{:.2e}" if ratio else "{:.3f}"
            cell = " / ".join("n/a" if v is None else "fails" if math.isnan(v) else fmt.format(v)
                              for v in (ours, theirs))
            if ratio and ours is not None and theirs is not None and not math.isnan(theirs):
                cell += f" ({ours / theirs:.2f})"
            cells.append(cell + (f" [{nfe}]" if nfe is not None and nfe != b else ""))
        lines.append(f"| {name} | {spacing} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best(results: Results, budget: int, side: int) -> str:
    """The configuration with the smallest error at `budget` for ours (side 0) or diffusers (side 1)."""
    scored = [(row[budget][side], f"{name}/{spacing}") for (name, spacing), row in results.items()
              if row[budget][side] is not None and not math.isnan(row[budget][side])]
    error, config = min(scored)
    return f"{config} {error:.2e}"


# ---------------------------------------------------------------------------------------------------------------------
# The flow process: x_t = (1 - t) x0 + t eps from pure noise (t = 1) to the data (t = 0). The reference integrates the
# velocity ODE dx_t/dt = E[eps - x0 | x_t], smooth on all of [0, 1], from x_1 = n to t = 0 (no sigma_min floor).
# Ours: sample_from_noise with the exact mixture D on our ladders. diffusers: its flow schedulers with the exact
# velocity, each evaluated at the flow sigma it steps from, started from x = n as their pipelines do (DPM-Solver's
# and UniPC's flow ladders start below t = 1, at 0.999 and 1 - 1e-6, so that truncation counts as error).

FLOW_DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc")
FLOW_DIFFUSERS_ONLY = ("unipc_2",)
FLOW_DIFFUSERS = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunDiscreteScheduler,
    "dpmpp_2m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2),
    "dpmpp_3m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=3),
    "unipc": partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh2", lower_order_final=True),
    "unipc_2": partial(UniPCMultistepScheduler, solver_order=2, solver_type="bh2", lower_order_final=True),
}


def flow_spacings(shifts: tuple[float, ...]) -> tuple[str, ...]:
    """Our ladders on the flow: t evenly spaced from t = 1 (pure noise) to 0 under each shift ("linspace_s3" is SD3's
    shift 3 at sampling, "linspace_s1" Flux's ladder at mu = 0), and karras / exponential as sampling_sigmas builds
    them on RectifiedFlow(): a first step from pure noise, then sigma 1.5 n down to 1 / (1.5 n), then 0."""
    return tuple(f"linspace_s{s:g}" for s in shifts) + SIGMA_SPACINGS


def flow_ladder(n: int, spacing: str) -> Tensor:
    """(n + 1,) float64 VE sigmas of our flow ladder `spacing` (see flow_spacings); "exponential@2" is "exponential"
    with spacing.OPEN_END_STEPS = 2 (open ends at sigma 2 n and 1 / (2 n)), to compare that constant."""
    if spacing.startswith("linspace_s"):
        schedule = TimestepShift(float(spacing.removeprefix("linspace_s"))).apply(RectifiedFlow())
        return sampling_sigmas(schedule, n, "linspace").double()
    spacing, _, open_end_steps = spacing.partition("@")
    default, spacing_module.OPEN_END_STEPS = spacing_module.OPEN_END_STEPS, float(open_end_steps or OPEN_END_STEPS)
    try:
        return sampling_sigmas(RectifiedFlow(), n, spacing).double()
    finally:
        spacing_module.OPEN_END_STEPS = default


def run_ours_flow(name: str, mixture: GaussianMixture, noise: Tensor, sigmas: Tensor,
                  seed: int = 1) -> tuple[Tensor, int]:
    """Our sampler through sample_from_noise (exact first step from sigma = inf), counting denoiser calls."""
    calls = 0

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return mixture.denoise(x, sigma)

    x = sample_from_noise(name, denoiser, noise, sigmas, generator=torch.Generator().manual_seed(seed))
    return x, calls


def flow_scheduler(name: str, spacing: str):
    """diffusers' flow scheduler for `name` on the ladder that matches our `spacing`, or None (karras/exponential:
    diffusers' flow versions space t, not sigma, so they are other ladders)."""
    if not spacing.startswith("linspace_s"):
        return None
    shift = float(spacing.removeprefix("linspace_s"))
    factory = FLOW_DIFFUSERS[name]
    if name in ("euler", "heun"):
        return factory(shift=shift)
    return factory(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                   final_sigmas_type="zero")


def run_diffusers_flow(scheduler, n: int, mixture: GaussianMixture, noise: Tensor) -> tuple[Tensor, int]:
    """diffusers' loop from x = noise with the exact velocity at each step's flow sigma. FlowMatchEuler gets Flux's
    sigmas linspace(1, 1/n, n) (our linspace ladder); its default set_timesteps(n) would end at shift(shift(1e-3))."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist())
    else:
        scheduler.set_timesteps(n)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(mixture.velocity(x, float(scheduler.sigmas[i])), t, x).prev_sample
    return x, len(scheduler.timesteps)


def flow_reference(mixture: GaussianMixture, noise: Tensor, rtol: float = 1e-10) -> Tensor:
    """x_0 of the velocity ODE from x_1 = noise, float64 (N, d)."""
    shape = noise.shape

    def velocity(t: float, y):
        return mixture.velocity(torch.from_numpy(y).view(shape), t).flatten().numpy()

    sol = solve_ivp(velocity, (1.0, 0.0), noise.flatten().numpy(), method="DOP853", rtol=rtol, atol=rtol, t_eval=[0.0])
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).view(shape)


def run_flow_grid(names: tuple[str, ...], spacings: tuple[str, ...], budgets: list[int], mixture: GaussianMixture,
                  noise: Tensor, metric: Callable[[Tensor], float]) -> Results:
    """As run_grid, on the flow process."""
    results: Results = {}
    for name in names:
        for spacing in spacings:
            if name not in SAMPLERS and flow_scheduler(name, spacing) is None:
                continue
            row = results.setdefault((name, spacing), {})
            for budget in budgets:
                n = steps_for(name.removesuffix("_2"), budget)
                ours = theirs = nfe = None
                if name in SAMPLERS:
                    x, nfe = run_ours_flow(name, mixture, noise, flow_ladder(n, spacing))
                    ours = metric(x)
                scheduler = flow_scheduler(name, spacing) if name in FLOW_DIFFUSERS else None
                if scheduler is not None:
                    x, nfe_theirs = run_diffusers_flow(scheduler, n, mixture, noise)
                    nfe, theirs = nfe_theirs, metric(x)
                row[budget] = (ours, theirs, nfe)
    return results


# (dim, components, seed) of the mixtures behind the flow default (--sweep): different sizes, modes and seeds
FLOW_SWEEP = ((32, 8, 0), (8, 2, 3), (16, 4, 5), (64, 16, 7), (16, 3, 11))


def geometric_mean(tables: list[Results]) -> Results:
    """Per cell, the geometric mean over several mixtures' tables (None stays None)."""
    merged: Results = {}
    for key, row in tables[0].items():
        merged[key] = {}
        for budget, (_, _, nfe) in row.items():
            sides = [[t[key][budget][side] for t in tables] for side in (0, 1)]
            merged[key][budget] = (*(None if v[0] is None else math.exp(sum(map(math.log, v)) / len(v))
                                     for v in sides), nfe)
    return merged


def main_flow(args: argparse.Namespace) -> None:
    """The flow-process tables (--schedule rectified_flow): one mixture, or with --sweep the geometric mean of the
    deterministic table over FLOW_SWEEP."""
    start = time.perf_counter()
    spacings = flow_spacings(tuple(args.shifts)) + tuple(f"exponential@{k:g}" for k in args.open_end_steps)
    mixtures = FLOW_SWEEP if args.sweep else ((args.dim, args.components, args.seed),)
    tables = []
    for dim, components, seed in mixtures:
        mixture = make_mixture(dim, components, seed)
        g = torch.Generator().manual_seed(seed + 1)
        noise = torch.randn(args.num_samples, dim, generator=g, dtype=torch.float64)
        x_ref = flow_reference(mixture, noise)
        x_loose = flow_reference(mixture, noise, rtol=1e-8)
        print(f"rectified flow (t = 1 .. 0), mixture of {components} diagonal Gaussians in {dim} dims (seed {seed}), "
              f"{args.num_samples} starting noises; reference: DOP853 rtol 1e-10 vs 1e-8 differ by "
              f"{median_relative_error(x_loose, x_ref):.1e}, E[z^2] {mixture.whitened_variance(x_ref):.3f}")
        tables.append(run_flow_grid(FLOW_DETERMINISTIC + FLOW_DIFFUSERS_ONLY, spacings, args.nfe, mixture, noise,
                                    partial(median_relative_error, x_ref=x_ref)))
    results = geometric_mean(tables)
    over = f" (geometric mean over {len(mixtures)} mixtures)" if len(mixtures) > 1 else ""
    print(f"\nmedian relative error vs the ODE reference{over}, ours / diffusers (ratio); [actual NFE] where it "
          f"differs\n")
    print(format_table(results, args.nfe, ratio=True))
    for budget in args.nfe:
        print(f"\nbest at NFE <= {budget}: ours {best(results, budget, 0)}; diffusers {best(results, budget, 1)}")
    if args.stochastic:
        mixture = make_mixture(args.dim, args.components, args.seed)
        g = torch.Generator().manual_seed(args.seed + 2)
        noise = torch.randn(args.num_stochastic, args.dim, generator=g, dtype=torch.float64)
        exact = mixture.whitened_variance(mixture.sample(args.num_stochastic, g))
        stochastic = run_flow_grid(STOCHASTIC, spacings, args.nfe, mixture, noise, mixture.whitened_variance)
        print(f"\nstochastic samplers, {args.num_stochastic} draws: within-component E[z^2], ours "
              f"(exact draws: {exact:.3f})\n")
        print(format_table(stochastic, args.nfe, ratio=False))
    print(f"\n{time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------------------------------
# The default against diffusers' best (--family): every shipped schedule, a family of generated mixtures, 10-50 NFE.
# "Best" is the configuration with the lowest geometric-mean error over the mixtures, per schedule and NFE, among all of
# diffusers' multistep solvers (DPM-Solver++ 2M and 3M, UniPC-2 and UniPC-3 with B(h) = e^h - 1, UniPC-3 with
# B(h) = h ("bh1"), DEIS-3) on every ladder it offers (leading, trailing, linspace, karras, exponential, beta; EDM: its EDM DPM-Solver on
# karras and exponential; the flow: its flow sigmas at shift 1 and 3, FlowMatchEuler included).

# schedule name -> our schedule; diffusers sees the same betas (trained_betas), rescaled by its own zero-SNR option
FAMILY_SCHEDULES: dict[str, Callable[[], object]] = {
    "scaled_linear": ScaledLinearSchedule, "linear": LinearSchedule, "cosine": CosineSchedule,
    "sigmoid": SigmoidSchedule,
    "scaled_linear_zero_snr": partial(ScaledLinearSchedule, zero_terminal_snr=True),
    "linear_zero_snr": partial(LinearSchedule, zero_terminal_snr=True),
    "cosine_zero_snr": partial(CosineSchedule, zero_terminal_snr=True),
    "edm": KarrasSchedule, "shifted_cosine": ShiftedCosineSchedule, "rectified_flow": RectifiedFlow,
}
FAMILY_SOLVERS = {
    "dpmpp_2m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2),
    "dpmpp_3m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=3),
    "unipc_2": partial(UniPCMultistepScheduler, solver_order=2, solver_type="bh2"),
    "unipc_3": partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh2"),
    "unipc_3_bh1": partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh1"),
    "deis_3": partial(DEISMultistepScheduler, solver_order=3),
}
FAMILY_LADDERS = ("leading", "trailing", "linspace", "karras", "exponential", "beta")


def random_mixture(seed: int) -> tuple[GaussianMixture, str]:
    """A mixture unlike make_mixture's: 4-64 dims, 1-12 components, mean spread 0.3-2, per-dimension stds log-uniform
    in [0.1, 2] (variances 0.01-4), softmax-normal weights; not rescaled. Returns it and a short description."""
    g = torch.Generator().manual_seed(1000 + seed)
    dim = (4, 8, 16, 32, 64)[int(torch.randint(5, (1,), generator=g))]
    k = int(torch.randint(1, 13, (1,), generator=g))
    spread = math.exp(torch.empty(1, dtype=torch.float64).uniform_(math.log(0.3), math.log(2.0), generator=g).item())
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * spread
    stds = torch.empty(k, dim, dtype=torch.float64).uniform_(math.log(0.1), math.log(2.0), generator=g).exp()
    log_weights = torch.randn(k, generator=g, dtype=torch.float64).log_softmax(0)
    return GaussianMixture(means, stds, log_weights), f"{k} in {dim}d, spread {spread:.2f}"


def schedule_ends(schedule) -> tuple[float, float]:
    """(sigma_min, sigma_max) that samplers see: the finite zero-SNR stand-in for a discrete schedule, inf for a flow."""
    if isinstance(schedule, RectifiedFlow):
        return 0.0, math.inf
    if schedule.discrete:
        table = spacing_module.finite_sigmas(schedule.sigmas)
        return table[0].item(), table[-1].item()
    return tuple(schedule.t_to_sigma(torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)).tolist())


def diffusers_betas(name: str, schedule) -> dict:
    """diffusers' arguments for our schedule: its betas (before our zero-SNR rescale, which diffusers then applies
    itself), or for shifted_cosine its alpha_bar sampled at t = k / 999 (diffusers has no continuous schedules)."""
    if schedule.discrete:
        base = FAMILY_SCHEDULES[name.removesuffix("_zero_snr")]()
        return {"trained_betas": base.betas.numpy(), "rescale_betas_zero_snr": name.endswith("_zero_snr")}
    alpha_bar = torch.sigmoid(schedule.logsnr(torch.linspace(0, 1, 1000, dtype=torch.float64)))
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return {"trained_betas": betas.clamp(max=0.9999).numpy()}


def run_diffusers_edm(order: int, ladder: str, n: int, mixture: GaussianMixture, noise: Tensor) -> Tensor:
    """diffusers' EDMDPMSolverMultistepScheduler (sigma_data 1, eps parameterization) with the exact D: its network
    output F solves D = c_skip x + c_out F."""
    scheduler = EDMDPMSolverMultistepScheduler(solver_order=order, sigma_schedule=ladder, final_sigmas_type="zero",
                                               sigma_data=1.0)
    scheduler.set_timesteps(n)
    x = noise * float(scheduler.sigmas[0])
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        c_skip, c_out = 1 / (sigma**2 + 1), sigma / (sigma**2 + 1) ** 0.5
        scheduler.scale_model_input(x, t)  # sets its step index, as a pipeline's call does
        x = scheduler.step((mixture.denoise(x, sigma) - c_skip * x) / c_out, t, x).prev_sample
    return x


def diffusers_family(name: str, schedule, n: int, mixture: GaussianMixture, noise: Tensor) -> dict[str, Tensor]:
    """Every diffusers configuration's samples for `schedule` at n steps, by "solver/ladder"; a configuration that
    raises (its multistep solvers on repeated rounded timesteps) is left out."""
    out: dict[str, Tensor] = {}
    if name == "edm":
        for order in (2, 3):
            for ladder in ("karras", "exponential"):
                out[f"edm_dpmpp_{order}m/{ladder}"] = run_diffusers_edm(order, ladder, n, mixture, noise)
        return out
    if name == "rectified_flow":
        for shift in (1.0, 3.0):
            for solver, factory in FAMILY_SOLVERS.items():
                if solver.startswith("deis"):
                    continue  # no flow sigmas in DEIS's step
                scheduler = factory(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
                out[f"{solver}/flow_shift{shift:g}"] = run_diffusers_flow(scheduler, n, mixture, noise)[0]
            euler = FlowMatchEulerDiscreteScheduler(shift=shift)
            out[f"euler/flow_shift{shift:g}"] = run_diffusers_flow(euler, n, mixture, noise)[0]
        return out
    betas = diffusers_betas(name, schedule)
    for solver, factory in FAMILY_SOLVERS.items():
        solver_betas = dict(betas)
        if "rescale_betas_zero_snr" not in inspect.signature(factory.func).parameters:
            if solver_betas.pop("rescale_betas_zero_snr", False):
                continue  # DEIS has no zero-SNR option
        for ladder in FAMILY_LADDERS:
            kwargs = {"num_train_timesteps": 1000, "prediction_type": "epsilon", **solver_betas}
            if ladder in ("karras", "exponential", "beta"):
                kwargs[f"use_{ladder}_sigmas"] = True
            else:
                kwargs |= {"timestep_spacing": ladder, "steps_offset": LEADING_OFFSET if ladder == "leading" else 0}
            try:
                out[f"{solver}/{ladder}"] = run_diffusers(factory(**kwargs), n, mixture, noise)[0]
            except (IndexError, AssertionError, ValueError, ImportError):  # repeated timesteps; beta needs scipy
                continue
    return out


def ours_family(schedule, n: int, mixture: GaussianMixture, noise: Tensor,
                contenders: dict[str, tuple[str, str, dict]]) -> dict[str, Tensor]:
    """Our contenders' samples ("label" -> (sampler, spacing, options)) through sample_from_noise, as the pipeline
    runs them; "auto" spacing resolves per schedule and steps as the pipeline's does."""
    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return mixture.denoise(x, sigma)

    out = {}
    for label, (sampler, spacing, options) in contenders.items():
        sampler = auto_sampler(n) if sampler == "auto" else sampler
        sigmas = sampling_sigmas(schedule, n, spacing, sampler=sampler).double()
        out[label] = sample_from_noise(sampler, denoiser, noise, sigmas, **options)
    return out


DEFAULT_CONTENDERS = {"default": ("auto", "auto", {}), "unipc/exponential_capped": ("unipc", "exponential_capped", {}),
                      "deis/karras_capped": ("deis", "karras_capped", {})}


def main_family(args: argparse.Namespace, contenders: dict[str, tuple[str, str, dict]] | None = None) -> dict:
    """The table of our default against diffusers' best per schedule and NFE (geometric means over the mixtures);
    returns {schedule: {nfe: {config: geometric-mean error}}}."""
    contenders = contenders or DEFAULT_CONTENDERS
    start = time.perf_counter()
    mixtures = [random_mixture(seed) for seed in range(args.mixtures)]
    print(f"{len(mixtures)} mixtures: " + "; ".join(d for _, d in mixtures) + f"; {args.num_samples} noises each\n")
    print("| schedule | NFE | " + " | ".join(contenders) + " | diffusers' best | ratio |")
    print("| --- | --- | " + " | ".join("---" for _ in contenders) + " | --- | --- |")
    results: dict = {}
    for name in args.family_schedules:
        schedule = FAMILY_SCHEDULES[name]()
        sigma_min, sigma_max = schedule_ends(schedule)
        logs: dict[int, dict[str, list[float]]] = {n: {} for n in args.nfe}
        for seed, (mixture, _) in enumerate(mixtures):
            g = torch.Generator().manual_seed(seed + 7)
            noise = torch.randn(args.num_samples, mixture.means.shape[1], generator=g, dtype=torch.float64)
            x_ref = flow_reference(mixture, noise) if math.isinf(sigma_max) else \
                reference(mixture, noise, sigma_max, sigma_min)[0]
            for n in args.nfe:
                samples = {**ours_family(schedule, n, mixture, noise, contenders),
                           **{f"diffusers {k}": v for k, v in diffusers_family(name, schedule, n, mixture,
                                                                                noise).items()}}
                for label, x in samples.items():
                    error = median_relative_error(x, x_ref)
                    if math.isfinite(error) and error > 0:  # a NaN or inf run drops that configuration
                        logs[n].setdefault(label, []).append(math.log(error))
        results[name] = {}
        for n in args.nfe:
            means = {label: math.exp(sum(v) / len(v)) for label, v in logs[n].items() if len(v) == len(mixtures)}
            results[name][n] = means
            theirs = min((v, k) for k, v in means.items() if k.startswith("diffusers "))
            cells = " | ".join(f"{means[label]:.2e}" for label in contenders)
            ratio = means[next(iter(contenders))] / theirs[0]
            print(f"| {name} | {n} | {cells} | {theirs[0]:.2e} ({theirs[1].removeprefix('diffusers ')}) | "
                  f"{ratio:.2f} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256, help="starting noises with an ODE reference")
    parser.add_argument("--num-stochastic", type=int, default=4096, help="draws per stochastic sampler run")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--schedule", choices=sorted(SCHEDULES) + ["rectified_flow"], default="scaled_linear")
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0, 3.0],
                        help="rectified_flow: the shifts of the t-uniform ladders")
    parser.add_argument("--stochastic", action="store_true", help="rectified_flow: also the stochastic samplers")
    parser.add_argument("--sweep", action="store_true", help="rectified_flow: geometric mean over FLOW_SWEEP")
    parser.add_argument("--open-end-steps", type=float, nargs="*", default=[],
                        help="rectified_flow: extra exponential ladders with these OPEN_END_STEPS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    parser.add_argument("--family", action="store_true",
                        help="the default sampler + ladder against diffusers' best on every shipped schedule")
    parser.add_argument("--family-schedules", nargs="+", choices=list(FAMILY_SCHEDULES), default=list(FAMILY_SCHEDULES))
    parser.add_argument("--mixtures", type=int, default=6, help="--family: generated mixtures per schedule")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.num_stochastic, args.dim, args.components, args.nfe = 8, 64, 4, 3, [5, 10]
    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared machine
    if args.family:
        if args.quick:
            args.mixtures, args.num_samples, args.nfe = 2, 8, [10]
        elif args.nfe == [5, 10, 20, 50]:
            args.nfe, args.num_samples = [10, 15, 20, 30, 50], min(args.num_samples, 128)
        main_family(args)
        return None
    if args.schedule == "rectified_flow":
        return main_flow(args)

    start = time.perf_counter()
    mixture = make_mixture(args.dim, args.components, args.seed)
    table = SCHEDULES[args.schedule][0]().sigmas
    sigma_min, sigma_max = table[0].item(), table[-1].item()
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.num_samples, args.dim, generator=g, dtype=torch.float64)
    x_ref, x_zero = reference(mixture, noise, sigma_max, sigma_min)
    x_loose, _ = reference(mixture, noise, sigma_max, sigma_min, rtol=1e-8)
    print(f"{args.schedule} (T = 1000, sigma {sigma_min:.4f} .. {sigma_max:.2f}), mixture of {args.components} "
          f"diagonal Gaussians in {args.dim} dims, {args.num_samples} starting noises")
    print(f"reference: DOP853 rtol 1e-10 vs 1e-8 differ by {median_relative_error(x_loose, x_ref):.1e}; "
          f"sigma_min floor (ODE on to sigma = 0) {median_relative_error(x_zero, x_ref):.1e}; "
          f"E[z^2] of the references {mixture.whitened_variance(x_ref):.3f}")

    results = run_grid(DETERMINISTIC + DIFFUSERS_ONLY, args.schedule, args.nfe, mixture, noise,
                       partial(median_relative_error, x_ref=x_ref))
    print("\nmedian relative error vs the ODE reference, ours / diffusers (ratio); [actual NFE] where it differs\n")
    print(format_table(results, args.nfe, ratio=True))
    for budget in (b for b in (10, 20) if b in args.nfe):
        print(f"\nbest at NFE <= {budget}: ours {best(results, budget, 0)}; diffusers {best(results, budget, 1)}")

    g = torch.Generator().manual_seed(args.seed + 2)
    noise = torch.randn(args.num_stochastic, args.dim, generator=g, dtype=torch.float64)
    exact = mixture.whitened_variance(mixture.sample(args.num_stochastic, g))
    stochastic = run_grid(STOCHASTIC, args.schedule, args.nfe, mixture, noise, mixture.whitened_variance)
    print(f"\nstochastic samplers, {args.num_stochastic} draws: within-component E[z^2], ours / diffusers "
          f"(exact draws: {exact:.3f})\n")
    print(format_table(stochastic, args.nfe, ratio=False))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
