"""The oracle behind bench/samplers.py: the closed-form mixture denoiser obeys Tweedie's formula against an independent
log-density, the ODE reference matches the closed-form flow of a single Gaussian, samplers converge to it, and the
diffusers harness reproduces our samplers where the algorithms agree."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from ldm.diffusion.schedules import ScaledLinearSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
SIGMAS = ScaledLinearSchedule().sigmas
SIGMA_MIN, SIGMA_MAX = SIGMAS[0].item(), SIGMAS[-1].item()


def torch_log_prob(mixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """ln p_sigma(x) from torch.distributions, independent of the bench's own formulas."""
    D = torch.distributions
    components = D.Independent(D.Normal(mixture.means, (mixture.stds**2 + sigma**2).sqrt()), 1)
    return D.MixtureSameFamily(D.Categorical(logits=mixture.log_weights), components).log_prob(x)


@pytest.mark.parametrize("sigma", [0.03, 0.5, 3.0, 14.6])
def test_denoiser_is_tweedie(sigma: float) -> None:
    # Tweedie: E[x0 | x] = x + sigma^2 grad ln p_sigma(x); score and denoiser must both agree with autograd
    mixture = bench.make_mixture(dim=6, components=3, seed=0)
    x0 = mixture.sample(32, torch.Generator().manual_seed(1))
    x = (x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(torch_log_prob(mixture, x, sigma).sum(), x)
    x = x.detach()
    torch.testing.assert_close(mixture.score(x, sigma), grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixture.denoise(x, sigma), x + sigma**2 * grad, rtol=1e-9, atol=1e-9)
    # a per-sample sigma (what samplers pass) is the same as a scalar one
    torch.testing.assert_close(mixture.denoise(x, torch.full((32,), sigma)), mixture.denoise(x, sigma))


def test_mixture_has_unit_variance() -> None:
    mixture = bench.make_mixture(dim=16, components=5, seed=3)
    x0 = mixture.sample(40000, torch.Generator().manual_seed(0))
    assert x0.var(0).mean().item() == pytest.approx(1.0, rel=0.03)
    assert mixture.whitened_variance(x0) == pytest.approx(1.0, rel=0.03)


def test_reference_matches_single_gaussian_flow() -> None:
    # one component N(mu, diag(s^2)): the flow is x(sigma) - mu = (x(sigma_max) - mu) sqrt((s^2 + sigma^2) /
    # (s^2 + sigma_max^2)) per dimension, so both references are closed-form
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(1, 5, generator=g, dtype=torch.float64), 0.2 + torch.rand(1, 5, generator=g, dtype=torch.float64)
    mixture = bench.GaussianMixture(mu, s, torch.zeros(1, dtype=torch.float64))
    noise = torch.randn(4, 5, generator=g, dtype=torch.float64)
    x_ref, x_zero = bench.reference(mixture, noise, SIGMA_MAX, SIGMA_MIN)

    def flow(sigma: float) -> torch.Tensor:
        return mu + (noise * SIGMA_MAX - mu) * ((s**2 + sigma**2) / (s**2 + SIGMA_MAX**2)).sqrt()

    torch.testing.assert_close(x_zero, flow(0.0), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x_ref, mu + (flow(SIGMA_MIN) - mu) * s**2 / (s**2 + SIGMA_MIN**2), rtol=1e-8, atol=1e-8)


def test_dpmpp_2m_converges_to_reference() -> None:
    mixture = bench.make_mixture(dim=8, components=4, seed=0)
    noise = torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_ref, _ = bench.reference(mixture, noise, SIGMA_MAX, SIGMA_MIN)
    errors = {}
    for n in (10, 50):
        x, nfe = bench.run_ours("dpmpp_2m", mixture, noise, bench.sigma_ladder(ScaledLinearSchedule(), n, "karras"))
        assert nfe == n
        errors[n] = bench.median_relative_error(x, x_ref)
    assert errors[50] < 1e-2
    assert errors[50] < errors[10] / 5  # second order: 5x the steps should cut the error by far more than 5


@pytest.mark.parametrize(("name", "spacing"), [("euler", "karras"), ("heun", "leading"), ("dpmpp_2m", "trailing"),
                                               ("dpmpp_2m", "exponential"), ("ddim", "trailing"),
                                               ("unipc", "trailing"), ("unipc", "exponential")])
def test_diffusers_harness_matches_ours(name: str, spacing: str) -> None:
    """Where diffusers defines the same ladder, its scheduler driven by the bench's eps model gives our samples."""
    mixture = bench.make_mixture(dim=8, components=4, seed=0)
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = 5  # divides T = 1000: diffusers' DDIM steps to t - T // n, which leaves the trailing ladder otherwise
    ours, nfe = bench.run_ours(name, mixture, noise, bench.sigma_ladder(ScaledLinearSchedule(), n, spacing))
    theirs, nfe_theirs = bench.run_diffusers(bench.diffusers_scheduler(name, spacing, "scaled_linear"), n, mixture,
                                             noise)
    assert nfe == nfe_theirs == (2 * n - 1 if name == "heun" else n)
    assert bench.median_relative_error(theirs, ours) < 1e-5  # diffusers keeps sigmas in float32


def test_steps_for_budget() -> None:
    assert [bench.steps_for("heun", b) for b in (5, 10, 20, 50)] == [3, 5, 10, 25]  # 5, 9, 19, 49 calls
    assert bench.steps_for("dpmpp_2m", 10) == 10


def test_quick_run_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| dpmpp_2m | karras |" in out and "best at NFE <= 10: ours" in out and "E[z^2]" in out
    assert not math.isnan(float(out.split("differ by ")[1].split(";")[0]))


def test_family_quick_run_compares_the_default_with_diffusers_best(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--family", "--quick", "--family-schedules", "scaled_linear", "rectified_flow"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| scaled_linear |")
            or line.startswith("| rectified_flow |")]
    assert len(rows) == 2  # one NFE in --quick
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "(" in cells[-2] and float(cells[-1]) > 0  # diffusers' best names its configuration; a ratio
