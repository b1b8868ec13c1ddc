"""Samplers as plain functions over a descending VE sigma ladder ending in 0, k-diffusion style: each takes a denoiser
D(x, sigma[B]) -> x0_hat and x = noise * sigmas[0], and integrates the probability-flow ODE or reverse SDE in VE form
(x = x0 + sigma eps; Karras et al. 2022). Use `ldm.diffusion.spacing` to build ladders for discrete schedules."""

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma[B]) -> denoised
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, x, denoised)
Sampler = Callable[..., Tensor]
SAMPLER_ARGS = ("denoiser", "x", "sigmas", "generator", "callback")  # every sampler's arguments; the rest are options


def _steps(sigmas: Tensor) -> list[tuple[float, float]]:
    """Consecutive (sigma, sigma_next) pairs as Python floats, after checking the ladder."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D ladder of n + 1 >= 2 values (n >= 1 steps), got shape {tuple(sigmas.shape)}")
    values = sigmas.tolist()
    if not all(math.isfinite(s) for s in values):
        raise ValueError("sigmas must be finite; start a ladder at sigma = inf (pure noise) with sample_from_noise, "
                         "or replace the infinite (zero-SNR) sigma with spacing.finite_sigmas")
    if not all(s > 0 for s in values[:-1]):  # every step divides by the sigma it starts from
        raise ValueError(f"only the last sigma may be 0, got {values}; a schedule that reaches sigma = 0 at t_min "
                         f"ends its ladder there (NoiseSchedule.get_sigmas) rather than appending another 0")
    return list(zip(values[:-1], values[1:]))


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma))


NoiseSource = Callable[[Tensor], Tensor]  # x -> a fresh draw like x (ldm.diffusion.diagnostics feeds unit vectors)
# one generator per sample makes the noise independent of batching
Generator = torch.Generator | Sequence[torch.Generator] | NoiseSource | None


def _noise(x: Tensor, generator: Generator) -> Tensor:
    """Fresh N(0, I) like x; a CPU generator gives device-independent noise, a list one draw per sample, a callable
    noise source whatever it returns."""
    if callable(generator) and not isinstance(generator, torch.Generator):
        return generator(x)
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
                            for g in generator])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting sigma_next^2 into a deterministic and a fresh-noise part; eta = 1 is the DDPM
    posterior, eta = 0 the DDIM ODE (Song et al. 2021, Eq. 16, in VE form; k-diffusion's get_ancestral_step)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


# ---------------------------------------------------------------------------------------------------------------------
# First-order samplers.


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, Eq. 4)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                           callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion; Song et al. 2021)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + _noise(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) in VE form: x' = x0 + sigma_down eps + sigma_up z. With eta = 0 this is the
    deterministic DDIM, identical to Euler in VE form; eta = 1 recovers DDPM."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = (x - denoised) / sigma
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + _noise(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None) -> Tensor:
    """Ancestral DDPM: sample the posterior q(x' | x, x0 = D(x)) (Ho et al. 2020, Eq. 6-7, "fixed_small" variance),
    in VE form: mean x0 + (sigma'/sigma)^2 (x - x0), variance sigma'^2 (1 - (sigma'/sigma)^2)."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        ratio = (sigma_next / sigma) ** 2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + _noise(x, generator) * sigma_next * (1 - ratio) ** 0.5
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Higher-order samplers.


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1, no churn); Euler for the last step to sigma = 0."""
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(denoiser, x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


# A multistep correction (D_0 - D_-1) / r extrapolates over a step up to 1 / r times longer than the one it was measured
# on; variable-step multistep methods stay stable only for bounded step growth (BDF2 for ratios below 1 + sqrt 2,
# Grigorieff 1983). Past a growth of 2 the DPM-Solver++ and UniPC solvers take a first-order step: on ladders that end
# at t = 0 (`leading`, `linspace`) the last log-sigma step is 3-5x the one before; there the SDE solver's extrapolation
# amplified the previous step's fresh noise (sample variance 1.13-1.85x the exact value at 50 steps on a unit
# Gaussian, 1.00-1.04x now; tests/test_sampler_diagnostics.py), and the deterministic ones become 1.1-3.7x more accurate
# on generated mixtures at 10-50 steps on scaled_linear, linear and cosine (unipc unchanged at 50 steps on
# scaled_linear; dpmpp_3m 1.3x worse there). Ladders whose steps grow by less (trailing, karras, exponential: the
# diffusers parity cases) are unchanged.
MAX_STEP_GROWTH = 2.0


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                    callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) in lambda = -ln sigma; first order at both
    ends, as diffusers' DPMSolverMultistepScheduler(solver_order=2) with final_sigmas_type="zero"."""
    old_denoised, h_last = None, 0.0
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised  # the exact limit h -> inf of the update below
            continue
        h = math.log(sigma / sigma_next)
        denoised_d = denoised
        if old_denoised is not None and h_last / h >= 1 / MAX_STEP_GROWTH:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                    callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095, Appendix B) in lambda = -ln sigma: the data prediction
    extrapolated from the last three evaluations by divided differences, exact in the exponential integrator's
    phi-functions. Order 1, 2, then 3 as the history fills; first order on the last step, and second order on the one
    before it with fewer than 15 steps, as diffusers' DPMSolverMultistepScheduler(solver_order=3,
    algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero")."""
    steps = _steps(sigmas)
    history: list[tuple[Tensor, float]] = []  # (denoised, the log-sigma step taken from there), newest last
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised  # the exact limit h -> inf of every order's update
            continue
        h = math.log(sigma / sigma_next)
        order = min(i + 1, 3, 2 if i == len(steps) - 2 and len(steps) < 15 else 3)
        if history and history[-1][1] / h < 1 / MAX_STEP_GROWTH:
            order = 1
        e = math.expm1(-h)  # e^-h - 1
        x = (sigma_next / sigma) * x - e * denoised
        if order == 2:
            d_1, h_0 = history[-1]
            x = x - 0.5 * e * (denoised - d_1) / (h_0 / h)
        elif order == 3:
            (d_2, h_1), (d_1, h_0) = history[-2:]
            r_0, r_1 = h_0 / h, h_1 / h
            slope_0, slope_1 = (denoised - d_1) / r_0, (d_1 - d_2) / r_1
            curvature = (slope_0 - slope_1) / (r_0 + r_1)
            x = x + (e / h + 1) * (slope_0 + r_0 * curvature) - ((e + h) / h**2 - 0.5) * curvature
        history = [*history[-1:], (denoised, h)]
    return x



@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                        callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Appendix; k-diffusion's midpoint variant); eta = 1
    matches diffusers' algorithm_type="sde-dpmsolver++", eta = 0 gives DPM-Solver++(2M)."""
    old_denoised, h_last = None, 0.0
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
        r = h_last / h
        if old_denoised is not None and r >= 1 / MAX_STEP_GROWTH:
            x = x - 0.5 * math.expm1(-h - eta_h) / r * (denoised - old_denoised)
        if eta > 0:
            x = x + _noise(x, generator) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
        old_denoised, h_last = denoised, h
    return x


def _deis_weight(t: float, b: float, others: Sequence[float]) -> float:
    """Antiderivative at sigma = t of the Lagrange basis polynomial in ln(sigma) that is 1 at node b and 0 at
    `others` (one or two nodes), d/dt of which is l_b(ln t): DEIS's "logrho" quadrature weights (Zhang & Chen 2023,
    arXiv:2204.13902, Eq. 15; diffusers' ind_fn)."""
    lt, lb = math.log(t), math.log(b)
    if len(others) == 1:
        (lc,) = map(math.log, others)
        return t * (lt - lc - 1) / (lb - lc)
    lc, ld = map(math.log, others)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))


@torch.no_grad()
def sample_deis(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                callback: StepCallback | None = None, order: int = 3) -> Tensor:
    """DEIS-p, "tAB" with the noise prediction eps = (x - D) / sigma interpolated by a polynomial in ln(sigma) over the
    last p evaluations and integrated exactly in sigma (Zhang & Chen 2023, arXiv:2204.13902; in VE form dx/dsigma =
    eps); as diffusers' DEISMultistepScheduler(solver_order=p, solver_type="logrho", lower_order_final=True): order
    1, 2, 3 as the history fills, lowered on the last two steps below 15 steps. A last step to sigma = 0 returns D,
    the limit of every order's update. Unlike the lambda-space solvers it keeps its order past a step growth of 2
    (MAX_STEP_GROWTH): on leading/linspace ladders that made it 1.0-3.4x less accurate, the others 1.1-3.7x more."""
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order}")
    steps = _steps(sigmas)
    history: list[tuple[Tensor, float]] = []  # (eps, sigma), newest last
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        eps = (x - denoised) / sigma
        history = [*history[-(order - 1):], (eps, sigma)] if order > 1 else [(eps, sigma)]
        if sigma_next == sigma:  # diffusers' DEIS ladders repeat their last sigma: an empty step
            continue
        few = len(steps) < 15
        step_order = min(len(history), 1 if few and i == len(steps) - 1 else 2 if few and i == len(steps) - 2 else 3)
        nodes = history[-step_order:][::-1]  # newest first
        for k, (e_k, s_k) in enumerate(nodes):
            others = [s for j, (_, s) in enumerate(nodes) if j != k]
            w = sigma_next - sigma if not others else \
                _deis_weight(sigma_next, s_k, others) - _deis_weight(sigma, s_k, others)
            x = x + w * e_k
    return x


def _unipc_weights(h: float, rks: Sequence[float], corrector: bool) -> list[float]:
    """UniPC's weights rho of the divided differences (D_k - D_0) / r_k for a step of h in lambda = -ln sigma, B(h) =
    e^h - 1 ("bh2"): the order conditions sum_k rho_k r_k^(j-1) = j! phi_(j+1)(h) / B(h), j = 1 .. p (Zhao et al. 2023,
    arXiv:2302.04867, Theorem 3.1; diffusers' multistep_uni_p/c_bh_update). `rks` are the earlier evaluations' r_k =
    (lambda_k - lambda_0) / h (negative); the corrector adds r = 1 for the new evaluation at the step's end and uses all
    p conditions, the predictor p - 1. As diffusers, the order-2 predictor takes rho = 1/2 and UniC-1 the trapezoid."""
    order = len(rks) + 1
    if corrector and order == 1:
        return [0.5]
    if not corrector and order == 2:
        return [0.5]
    hh = -h
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / math.expm1(hh))
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    nodes = [*rks, 1.0] if corrector else list(rks)
    size = len(nodes)
    matrix = torch.tensor([[r ** (j - 1) for r in nodes] for j in range(1, size + 1)], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(b[:size], dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
                 callback: StepCallback | None = None, order: int = 3) -> Tensor:
    """UniPC-p, B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, arXiv:2302.04867, Algorithms 1-2) in
    lambda = -ln sigma: the UniC corrector redoes each step with the evaluation at its end, which the next step needs
    anyway, then the UniP predictor steps on from the last `order` evaluations; one evaluation per step. The order
    rises 1, 2, .. as the history fills and falls to 1 on the last step (min(order, steps left)), with no corrector
    after the last step, as diffusers' UniPCMultistepScheduler(solver_order=order, solver_type="bh2",
    lower_order_final=True, final_sigmas_type="zero"). Order 3 is the default here (diffusers' is 2): on the
    Gaussian mixtures of bench/samplers.py it is 1.4x (10 steps) to 12x (50) more accurate than order 2 on
    scaled_linear's exponential ladder (bench/RESULTS.md); order 2
    is UniP-2 = DPM-Solver++(2M) plus UniC-2. The callback sees x before its correction, where D was taken."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    steps = _steps(sigmas)
    history: list[tuple[Tensor, float]] = []  # (denoised, lambda = -ln sigma) at the evaluations, newest last
    x_last, step_order = x, 1  # the predictor's input and order at the previous step, which the corrector redoes
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = _denoise(denoiser, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        if sigma_next == 0:
            x = denoised  # the limit h -> inf of the update below, which scales x (corrected or not) by 0
            continue
        if history:  # UniC: the previous step again, now with D at its end
            (d_0, lam_0), earlier = history[-1], history[-step_order:-1][::-1]
            h = -math.log(sigma) - lam_0
            rks = [(lam - lam_0) / h for _, lam in earlier]
            rhos = _unipc_weights(h, rks, corrector=True)
            residual = sum((w * (d - d_0) / r for w, (d, _), r in zip(rhos, earlier, rks)), rhos[-1] * (denoised - d_0))
            x = (sigma / math.exp(-lam_0)) * x_last - math.expm1(-h) * (d_0 + residual)
        history = [*history[-(order - 1):], (denoised, -math.log(sigma))] if order > 1 else [(denoised, -math.log(sigma))]
        step_order = min(order, len(steps) - i, len(history))  # lower order first and on the final steps
        if len(history) > 1 and (history[-1][1] - history[-2][1]) / math.log(sigma / sigma_next) < 1 / MAX_STEP_GROWTH:
            step_order = 1
        lam_0, h = -math.log(sigma), math.log(sigma / sigma_next)
        earlier = history[-step_order:-1][::-1]
        rks = [(lam - lam_0) / h for _, lam in earlier]
        rhos = _unipc_weights(h, rks, corrector=False) if earlier else []
        residual = sum((w * (d - denoised) / r for w, (d, _), r in zip(rhos, earlier, rks)), torch.zeros_like(x))
        x_last = x
        x = (sigma_next / sigma) * x - math.expm1(-h) * (denoised + residual)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Starting from noise, pure noise (sigma = inf) included.

PURE_NOISE_SIGMA = 2.0**30  # where D is evaluated for sigma = inf (see sample_from_noise)


def _pure_noise_denoised(denoiser: Denoiser, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x, D(x, sigma)) at sigma = PURE_NOISE_SIGMA, x = noise * sigma, in float32 or wider. D depends on x only
    through c_in x (c_in ~ 1 / sigma), so this is D's limit at SNR 0: in float32, 1 + 2^30 rounds to 2^30 and
    c_in x = noise and a flow model's t = 1 come out exact; sigma^2 = 2^60 stays finite for VP scalings."""
    dtype = torch.promote_types(noise.dtype, torch.float32)  # 2^30 overflows fp16
    x = noise.to(dtype) * PURE_NOISE_SIGMA
    return x, _denoise(denoiser, x, PURE_NOISE_SIGMA).to(dtype)


@torch.no_grad()
def sample_from_noise(sampler: Sampler | str, denoiser: Denoiser, noise: Tensor, sigmas: Tensor, *,
                      x0: Tensor | None = None, generator: Generator = None, callback: StepCallback | None = None,
                      **options) -> Tensor:
    """Run a sampler from x = x0 + sigmas[0] noise (x0 = 0 unless img2img), where the ladder may start at sigma = inf:
    pure noise, SNR 0 (rectified flow's t = 1), whose x = inf noise has no finite VE form. That first step is then
    the limit sigma -> inf of the samplers' first step, x = D(noise at SNR 0) + sigmas[1] noise, taken without
    dividing by inf: Euler's, DDIM's and DPM-Solver's own limit (x + (x - D) (sigma' - sigma) / sigma -> D + sigma'
    noise); the ancestral and SDE limits draw fresh noise in place of this one, which has the same law since D at SNR
    0 is E[x0] whatever the noise; Heun's trapezoid has no finite limit. The sampler then runs on sigmas[1:] without
    that step in its history (DPM-Solver's second-order term after an infinite log-SNR step is 0; UniPC's corrector
    of it is left out). The callback sees step 0 with x = PURE_NOISE_SIGMA noise, where D was evaluated."""
    sample_fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    if not math.isinf(sigmas[0].item()):
        x = noise * sigmas[0] if x0 is None else x0 + noise * sigmas[0]
        return sample_fn(denoiser, x, sigmas, generator=generator, callback=callback, **options)
    if len(sigmas) < 2 or not math.isfinite(sigmas[1].item()):
        raise ValueError(f"a ladder from sigma = inf needs a finite second sigma, got {sigmas.tolist()}")
    if len(sigmas) > 2:
        _steps(sigmas[1:])  # the rest must be a valid ladder before the model runs
    if sample_fn in FINITE_LIMIT and len(sigmas) > 2:
        # The first step in the sampler's own history: from PURE_NOISE_SIGMA, where its update is the limit above to
        # ~sigma_1 / 2^30, and the next steps (and UniPC's corrector of this one) use that evaluation. On the flow
        # family (bench/samplers.py --family) UniPC-3 is 1.5-2x more accurate so than with the step left out.
        dtype = torch.promote_types(noise.dtype, torch.float32)
        ladder = torch.cat([sigmas.new_full((1,), PURE_NOISE_SIGMA), sigmas[1:]])
        out = sample_fn(denoiser, noise.to(dtype) * PURE_NOISE_SIGMA, ladder.to(dtype), generator=generator,
                        callback=callback, **options)
        return out.to(noise.dtype)  # x0 drowns at SNR 0: img2img at strength 1 is txt2img
    x, denoised = _pure_noise_denoised(denoiser, noise)
    if callback is not None:
        callback(0, x, denoised)
    x = (denoised + noise * sigmas[1]).to(noise.dtype)  # x0 drowns at SNR 0: img2img at strength 1 is txt2img
    if len(sigmas) == 2:
        return x
    shifted = None if callback is None else lambda i, x, denoised: callback(i + 1, x, denoised)
    return sample_fn(denoiser, x, sigmas[1:], generator=generator, callback=shifted, **options)


# ---------------------------------------------------------------------------------------------------------------------
# Registry.

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "deis": sample_deis,
}


FEW_STEPS = 20  # below this many steps auto_sampler picks DEIS-3, from it on UniPC-3 (bench/samplers.py --family)


def auto_sampler(steps: int) -> str:
    """The default sampler for `steps` ("auto"): "deis" (DEIS-3 on spacing.auto_spacing's karras_capped ladder) below
    FEW_STEPS, else "unipc" (UniPC-3 on exponential_capped): DEIS-3 on its ladder leads at 10 and 15 evaluations,
    UniPC-3 on its ladder from 20 on, on every shipped schedule (bench/RESULTS.md)."""
    return "deis" if steps < FEW_STEPS else "unipc"


# exponential-integrator samplers whose first step from PURE_NOISE_SIGMA is their sigma = inf limit (sample_from_noise)
FINITE_LIMIT = (sample_dpmpp_2m, sample_dpmpp_3m, sample_unipc, sample_deis)


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under `name`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
