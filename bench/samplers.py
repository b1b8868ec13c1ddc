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
to t - T // n), the ratio is not 1 and measures the two definitions. Our unipc (UniPC-2, bh2) runs against diffusers'
UniPCMultistepScheduler(solver_type="bh2", solver_order=2); one diffusers-only solver, DPM-Solver++(3M), is included
so that "best diffusers configuration" means what it says. A cell reads "fails" where diffusers raises (its multistep
solvers on repeated rounded timesteps, e.g. cosine + karras).

    python bench/samplers.py                                  # scaled_linear, 256 samples, NFE 5 10 20 50
    python bench/samplers.py --schedule cosine --nfe 10 20
    python bench/samplers.py --quick                          # smoke test, a few seconds
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
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from scipy.integrate import solve_ivp
from torch import Tensor

from ldm.diffusion.samplers import SAMPLERS, get_sampler
from ldm.diffusion.schedules import CosineSchedule, DiscreteSchedule, ScaledLinearSchedule
from ldm.diffusion.spacing import SIGMA_SPACINGS, discrete_sigmas
from ldm.diffusion.spacing import SPACINGS as TIMESTEP_SPACINGS

SPACINGS = TIMESTEP_SPACINGS + SIGMA_SPACINGS  # leading, trailing, linspace, karras, exponential
DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m", "unipc")
DIFFUSERS_ONLY = ("dpmpp_3m",)  # diffusers' stronger solvers, rows without an "ours"
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
    "unipc": partial(UniPCMultistepScheduler, solver_order=2, solver_type="bh2", predict_x0=True,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=256, help="starting noises with an ODE reference")
    parser.add_argument("--num-stochastic", type=int, default=4096, help="draws per stochastic sampler run")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="scaled_linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.num_stochastic, args.dim, args.components, args.nfe = 8, 64, 4, 3, [5, 10]
    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared machine

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
