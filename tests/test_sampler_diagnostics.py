"""The closed-form variance of every sampler on Gaussian data (ldm.diffusion.diagnostics): checked against Monte Carlo
and the exact ODE, then used as the oracle for the stochastic samplers' output variance on every ladder, and for the
pipeline's warning on poor sampler x ladder combinations (Heun on cosine's trailing ladder, issue 12)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.diagnostics import gaussian_variance_ratio, sampling_warning
from ldm.diffusion.samplers import SAMPLERS, sample_from_noise
from ldm.diffusion.schedules import (
    CosineSchedule,
    KarrasSchedule,
    LinearSchedule,
    RectifiedFlow,
    ScaledLinearSchedule,
    ShiftedCosineSchedule,
    SigmoidSchedule,
)
from ldm.diffusion.spacing import SIGMA_SPACINGS, SPACINGS, sampling_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = {
    "scaled_linear": ScaledLinearSchedule, "linear": LinearSchedule, "cosine": CosineSchedule,
    "sigmoid": SigmoidSchedule, "scaled_linear_zero_snr": lambda: ScaledLinearSchedule(zero_terminal_snr=True),
    "edm": KarrasSchedule, "shifted_cosine": ShiftedCosineSchedule, "rectified_flow": RectifiedFlow,
}
LADDERS = SPACINGS + SIGMA_SPACINGS


def monte_carlo_variance(name: str, sigmas: torch.Tensor, v: float, n: int = 200_000, **options) -> float:
    """The same sampler on n real draws of 1-D data N(0, v), its sample variance over the exact one."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    out = sample_from_noise(name, lambda x, s: x * (v / (v + s[:, None] ** 2)), noise, sigmas.double(), generator=g,
                            **options)
    s0 = sigmas[0].item()
    return out.var().item() / (v if math.isinf(s0) else v * s0**2 / (v + s0**2))


@pytest.mark.parametrize("schedule", ["cosine", "rectified_flow"])
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m", "heun"])
def test_closed_form_matches_monte_carlo(name: str, schedule: str) -> None:
    """Independent oracle: 200k real draws (sampling error of a variance ~0.3%) agree with the coefficient trick."""
    sigmas = sampling_sigmas(SCHEDULES[schedule](), 12, "karras")
    exact = gaussian_variance_ratio(name, sigmas, data_variance=0.5)
    assert monte_carlo_variance(name, sigmas, 0.5) == pytest.approx(exact, rel=0.015)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_deterministic_solvers_converge_to_the_exact_ode(schedule: str) -> None:
    """The exact flow keeps v sigma_0^2 / (v + sigma_0^2): high-order solvers reach it to 1e-3 at 200 steps."""
    for name in ("unipc", "dpmpp_3m"):
        assert gaussian_variance_ratio(name, sampling_sigmas(SCHEDULES[schedule](), 200, "exponential")) == \
            pytest.approx(1.0, abs=1e-3)


# dpmpp_2m_sde at 50 steps, data variance 0.25 / 1 / 4: measured 0.953 .. 1.061 on every ladder (0.997 .. 1.038 at
# variance 1) but karras on the schedules that span sigma 0.006 .. 2e4 (cosine 1.18, zero-SNR 1.09, shifted cosine
# 1.09 at variance 1): there the karras ladder's log-sigma steps near sigma ~ 1 are 0.5 .. 1 long, too coarse for the
# noise, and the pipeline warns (its exponential ladder keeps 1.03).
COARSE_KARRAS = {("cosine", "karras"), ("scaled_linear_zero_snr", "karras"), ("shifted_cosine", "karras")}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_sde_solver_variance_is_within_a_few_percent_at_50_steps(schedule: str) -> None:
    for spacing in LADDERS:
        sigmas = sampling_sigmas(SCHEDULES[schedule](), 50, spacing)
        for v in (0.25, 1.0, 4.0):
            ratio = gaussian_variance_ratio("dpmpp_2m_sde", sigmas, data_variance=v)
            if (schedule, spacing) in COARSE_KARRAS:
                assert ratio > 1.05 or v != 1.0  # the combination the pipeline warns about (below)
            else:
                assert ratio == pytest.approx(1.0, abs=0.065), (spacing, v, ratio)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_long_last_step_no_longer_amplifies_the_sde_noise(spacing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ladders ending at t = 0 have a last log-sigma step 3-5x the previous one; the second-order correction over it
    amplified the previous step's noise until the solver took first-order steps past a step growth of 2."""
    from ldm.diffusion import samplers

    for n in (20, 50):
        sigmas = sampling_sigmas(ScaledLinearSchedule(), n, spacing)
        assert gaussian_variance_ratio("dpmpp_2m_sde", sigmas) == pytest.approx(1.0, abs=0.02)  # measured 0.989 .. 1.004
        with monkeypatch.context() as m:
            m.setattr(samplers, "MAX_STEP_GROWTH", math.inf)  # the correction at any step growth, as before
            assert gaussian_variance_ratio("dpmpp_2m_sde", sigmas) > 1.1  # measured 1.13 (50 steps) .. 1.64 (20)


@pytest.mark.parametrize("name", ["euler_ancestral", "ddpm"])
def test_first_order_ancestral_samplers_lose_variance_at_first_order(name: str) -> None:
    """Ancestral steps treat D as known over the step, losing (1 - r^2)^2 Var(x0 | x) each: O(h) in all, as in
    k-diffusion and diffusers (parity tests). The deficit halves as the steps double, which the warning reports."""
    deficit = [1 - gaussian_variance_ratio(name, sampling_sigmas(ScaledLinearSchedule(), n, "trailing"))
               for n in (50, 100, 200)]
    assert 0.05 < deficit[0] < 0.2
    for coarse, fine in zip(deficit, deficit[1:]):
        assert fine / coarse == pytest.approx(0.5, abs=0.08)


def test_every_sampler_is_a_linear_recursion_the_check_can_run() -> None:
    sigmas = sampling_sigmas(CosineSchedule(), 8, "trailing")
    for name in SAMPLERS:
        assert math.isfinite(gaussian_variance_ratio(name, sigmas)) and gaussian_variance_ratio(name, sigmas) > 0


def test_heun_on_the_huge_first_step_of_cosine_warns_and_names_a_better_choice() -> None:
    """Issue 12: heun on the default cosine ladder (sigma 20291 -> 6.4 in one step) gave colour-inverted images."""
    def ladder(spacing: str, n: int) -> torch.Tensor:
        return sampling_sigmas(CosineSchedule(), n, spacing)
    assert gaussian_variance_ratio("heun", ladder("trailing", 15)) > 100
    alternatives = [(s, p) for s in ("heun", "unipc") for p in LADDERS]
    message = sampling_warning("heun", "trailing", 15, ladder, alternatives=alternatives)
    assert message is not None and "sampler=heun spacing=trailing with 15 steps" in message
    assert "noisy or diverging" in message and "sampler=unipc spacing=" in message
    assert sampling_warning("unipc", "trailing", 15, ladder, alternatives=alternatives) is None  # 100% kept


def test_a_first_order_sampler_is_told_how_many_steps_it_needs() -> None:
    def ladder(spacing: str, n: int) -> torch.Tensor:
        return sampling_sigmas(ScaledLinearSchedule(), n, spacing)
    message = sampling_warning("euler_ancestral", "trailing", 20, ladder,
                               alternatives=[("euler_ancestral", p) for p in LADDERS])
    assert message is not None and "smooth, washed-out" in message
    assert "no ladder keeps it within 5% at 20 steps; 160 steps do" in message  # 0.74 at 20, 0.95 at 160


def test_the_pipeline_warns_once_per_combination(recwarn: pytest.WarningsRecorder) -> None:
    from test_pipeline import tiny_pipeline  # random tiny parts, cosine schedule

    pipeline = tiny_pipeline()
    pipeline.generate(["a red circle"], [0], sampler="heun", steps=4)
    pipeline.generate(["a red circle"], [1], sampler="heun", steps=4)
    messages = [str(w.message) for w in recwarn if "keeps" in str(w.message)]
    assert len(messages) == 1 and "sampler=heun spacing=auto with 4 steps" in messages[0]
    pipeline.generate(["a red circle"], [0], sampler="unipc", steps=20)
    assert len([w for w in recwarn if "keeps" in str(w.message)]) == 1  # a good combination is silent
