"""Weightings at SNR = 0 and inf, noise-level samplers, offset noise / input perturbation, DenoisingLoss training."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.noise_levels import (
    LogitNormalTimesteps,
    LogNormalSigmas,
    UniformTimesteps,
    noise_level_at,
    offset_noise,
    perturb_noise,
)
from ldm.diffusion.parameterization import EDMPrecond, EpsPrediction, VPrediction, X0Prediction, append_dims
from ldm.diffusion.schedules import KarrasSchedule, ScaledLinearSchedule, logsnr_from_sigma
from ldm.diffusion.weighting import (
    SNR,
    EDMWeighting,
    MinSNR,
    SNRPlusOne,
    SoftMinSNR,
    TruncatedSNR,
    Uniform,
)

CONF = Path(__file__).parents[1] / "conf" / "diffusion"
INF = math.inf
PARAMETERIZATIONS = {"eps": EpsPrediction(), "v": VPrediction(), "x0": X0Prediction(), "edm": EDMPrecond(0.5)}
WEIGHTINGS = {
    "uniform": Uniform(),
    "snr": SNR(),
    "snr_plus_one": SNRPlusOne(),
    "truncated_snr": TruncatedSNR(),
    "min_snr": MinSNR(5.0),
    "soft_min_snr": SoftMinSNR(5.0),
    "edm": EDMWeighting(0.5),
}
# x0-space lambda(SNR), written out directly
LAMBDA = {
    "snr": lambda snr: snr,
    "snr_plus_one": lambda snr: snr + 1,
    "truncated_snr": lambda snr: snr.clamp(min=1),
    "min_snr": lambda snr: snr.clamp(max=5.0),
    "soft_min_snr": lambda snr: 1 / (1 / snr + 1 / 5.0),
    "edm": lambda snr: (1 / snr + 0.25) / (0.25 / snr),  # (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
}
# Where lambda c_out^2 itself is infinite: eps-prediction at SNR = 0 (x0 = (x - sigma eps) / alpha is unbounded) under
# a lambda that stays positive there, and x0-prediction at SNR = inf under a lambda that grows without bound.
INFINITE = {
    ("snr_plus_one", "eps", -INF),
    ("truncated_snr", "eps", -INF),
    ("edm", "eps", -INF),
    ("snr", "x0", INF),
    ("snr_plus_one", "x0", INF),
    ("truncated_snr", "x0", INF),
    ("edm", "x0", INF),
}


class FixedTimesteps:
    """A test sampler: every sample at the given steps (repeated over the batch)."""

    def __init__(self, t):
        self.t = torch.as_tensor(t)

    def __call__(self, schedule, batch_size, *, device=None, generator=None):
        return noise_level_at(
            schedule, self.t.to(device).repeat(batch_size // len(self.t.view(-1)) + 1)[:batch_size]
        )


class WithEnds(UniformTimesteps):
    """Uniform timesteps, but the first two samples always sit at t = T - 1 (SNR = 0 when rescaled) and t = 0."""

    def __call__(self, schedule, batch_size, *, device=None, generator=None):
        t = super().__call__(schedule, batch_size, device=device, generator=generator).t
        t[0], t[1] = schedule.t_max, 0
        return noise_level_at(schedule, t)


# --- weightings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p_name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("w_name", list(WEIGHTINGS))
def test_weights_at_snr_zero_and_inf(w_name, p_name):
    weight = WEIGHTINGS[w_name](torch.tensor([-INF, INF]), PARAMETERIZATIONS[p_name])
    for end, w in zip([-INF, INF], weight.tolist()):
        if (w_name, p_name, end) in INFINITE:
            assert w == INF
        else:
            assert math.isfinite(w) and w >= 0, (w_name, p_name, end, w)


@pytest.mark.parametrize("p_name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("w_name", list(LAMBDA))
def test_weights_are_lambda_times_c_out_squared(w_name, p_name):
    p = PARAMETERIZATIONS[p_name]
    sigma = torch.logspace(-3, 2.5, 200, dtype=torch.float64)
    snr = sigma**-2
    c_out = p.scalings(sigma)[1]
    expected = LAMBDA[w_name](snr) * c_out**2
    torch.testing.assert_close(
        WEIGHTINGS[w_name](logsnr_from_sigma(sigma), p).double(), expected, rtol=1e-4, atol=0
    )


def test_min_snr_matches_the_paper():
    snr = torch.logspace(-4, 4, 101)
    logsnr = snr.log()
    gamma = torch.full_like(snr, 5.0)
    torch.testing.assert_close(MinSNR(5.0)(logsnr, EpsPrediction()), torch.minimum(snr, gamma) / snr)
    torch.testing.assert_close(MinSNR(5.0)(logsnr, VPrediction()), torch.minimum(snr, gamma) / (snr + 1))
    # the limits: eps-prediction 1 at SNR = 0, v-prediction 0 there; both 0 at SNR = inf
    ends = torch.tensor([-INF, INF])
    assert MinSNR(5.0)(ends, EpsPrediction()).tolist() == [1.0, 0.0]
    assert MinSNR(5.0)(ends, VPrediction()).tolist() == [0.0, 0.0]


def test_soft_min_snr_matches_k_diffusion():
    # k-diffusion's Denoiser weighting "soft-min-snr" on EDM's F: (sigma sigma_data)^2 / (sigma^2 + sigma_data^2)^2
    sigma, sd = torch.logspace(-3, 2, 50), 0.5
    expected = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
    torch.testing.assert_close(SoftMinSNR(1 / sd**2)(logsnr_from_sigma(sigma), EDMPrecond(sd)), expected)


def test_weights_that_are_one_by_construction():
    logsnr = torch.tensor([-INF, -20.0, 0.0, 20.0, INF])
    ones = torch.ones(5)
    torch.testing.assert_close(EDMWeighting(0.5)(logsnr, EDMPrecond(0.5)), ones, rtol=1e-4, atol=0)
    torch.testing.assert_close(SNR()(logsnr[:-1], EpsPrediction()), ones[:-1])  # eps-MSE
    torch.testing.assert_close(SNRPlusOne()(logsnr, VPrediction()), ones)  # v-MSE
    torch.testing.assert_close(Uniform()(logsnr, EpsPrediction()), ones)


# --- noise levels -----------------------------------------------------------------------------------------------------


def test_uniform_timesteps():
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    level = UniformTimesteps()(schedule, 20000, generator=torch.Generator().manual_seed(0))
    assert level.t.dtype == torch.long and level.t.min() >= 0 and level.t.max() <= 999
    counts = torch.bincount(level.t // 100, minlength=10).float()
    assert (counts - 2000).abs().max() < 200  # ~4.5 standard deviations
    torch.testing.assert_close(level.alpha**2 + level.sigma**2, torch.ones(20000))
    torch.testing.assert_close(level.logsnr, schedule.logsnr(level.t))
    # continuous schedules: t ~ U[0, 1)
    t = UniformTimesteps()(KarrasSchedule(), 20000, generator=torch.Generator().manual_seed(0)).t
    assert t.is_floating_point() and 0 <= t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = LogitNormalTimesteps(mean=0.5, std=0.8)(KarrasSchedule(), 20000, generator=g).t
    logit = (t / (1 - t)).log()
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    t = LogitNormalTimesteps(mean=0.5, std=0.8)(ScaledLinearSchedule(), 20000, generator=g).t
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    u = (t.float() + 0.5) / 1000  # bin centres
    assert abs((u / (1 - u)).log().mean() - 0.5) < 0.03


def test_lognormal_sigmas():
    schedule = ScaledLinearSchedule()
    level = LogNormalSigmas(-1.2, 1.2)(schedule, 20000, generator=torch.Generator().manual_seed(0))
    log_sigma = -level.logsnr / 2
    assert abs(log_sigma.mean() + 1.2) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03
    torch.testing.assert_close(level.alpha / level.sigma, (level.logsnr / 2).exp())  # sqrt(SNR)
    assert level.t.is_floating_point() and 0 <= level.t.min() and level.t.max() <= 999
    inside = (level.t > 0) & (level.t < 999)
    torch.testing.assert_close(schedule.logsnr(level.t[inside]), level.logsnr[inside], rtol=1e-4, atol=1e-4)


def test_samplers_are_reproducible():
    for sampler in [UniformTimesteps(), LogitNormalTimesteps(), LogNormalSigmas()]:
        a, b = (
            sampler(ScaledLinearSchedule(), 8, generator=torch.Generator().manual_seed(3)) for _ in range(2)
        )
        assert torch.equal(a.t, b.t) and torch.equal(a.logsnr, b.logsnr)


def test_offset_noise_statistics():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(256, 16, 8, 8, generator=g)
    offset = offset_noise(eps, 0.1, g) - eps  # (B, C, H, W), constant over H, W
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6, rtol=0)
    assert abs(offset[:, :, 0, 0].std() - 0.1) < 0.005 and abs(offset.mean()) < 0.005
    assert offset_noise(eps, 0.0, g) is eps


def test_input_perturbation_statistics():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 4, 16, 16, generator=g)
    delta = perturb_noise(eps, 0.1, g) - eps
    assert abs(delta.std() - 0.1) < 0.002 and abs(delta.mean()) < 0.002
    assert abs(torch.corrcoef(torch.stack([delta.flatten(), eps.flatten()]))[0, 1]) < 0.02
    assert abs(delta.mean(dim=(2, 3)).std() - 0.1 / 16) < 0.001  # per pixel, not per channel


@pytest.mark.parametrize("offset, gamma", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1)])
def test_loss_applies_offset_noise_and_input_perturbation(offset, gamma):
    # eps-prediction with x0 = 0: x = sigma * noise, and a network answering x / sigma leaves exactly the part of the
    # input noise that the target lacks; offset noise must be in both (residual 0), the perturbation in the input only
    schedule = ScaledLinearSchedule()
    loss_fn = DenoisingLoss(
        schedule, EpsPrediction(schedule), Uniform(), FixedTimesteps([500]), offset, gamma
    )
    sigma = schedule.alpha_sigma(torch.tensor(500))[1]
    inputs = []

    def model_fn(x_in, c_noise, context):
        assert torch.equal(c_noise, torch.full((256,), 500.0))
        inputs.append(x_in)
        return x_in / sigma

    out = loss_fn(model_fn, torch.zeros(256, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    assert abs(out.loss.mean() - gamma**2) < 0.05 * gamma**2 + 1e-10
    channel_means = (inputs[0] / sigma).mean(dim=(2, 3))  # (B, C): offset noise shows up here
    expected_std = math.sqrt(offset**2 + (1 + gamma**2) / 256)
    assert abs(channel_means.std() - expected_std) < 0.06 * expected_std


# --- DenoisingLoss ----------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Two 3x3 convs; the timestep enters as an extra input channel."""

    def __init__(self, channels: int = 4, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, c_noise, context):
        t = append_dims(c_noise / 1000, x.ndim).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv2(nn.functional.silu(self.conv1(torch.cat([x, t], dim=1))))


def test_zero_terminal_snr_v_prediction_trains():
    torch.manual_seed(0)
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    loss_fn = DenoisingLoss(schedule, VPrediction(schedule), MinSNR(5.0), WithEnds(), offset_noise=0.05)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x0 = torch.randn(1, 4, 1, 1).expand(16, 4, 8, 8)  # every sample the same image: trivially learnable

    def eval_loss():  # the same noise levels and noise every time
        with torch.no_grad():
            return loss_fn(net, x0, generator=torch.Generator().manual_seed(123)).loss.mean().item()

    before = eval_loss()
    for step in range(30):
        out = loss_fn(net, x0, generator=torch.Generator().manual_seed(step))
        assert out.t[0] == 999 and out.logsnr[0] == -INF and out.sigma[0] == INF and out.snr[0] == 0
        assert out.loss.shape == (16,) and out.loss.isfinite().all()
        opt.zero_grad()
        out.loss.mean().backward()
        assert all(p.grad.isfinite().all() for p in net.parameters())
        opt.step()
    assert eval_loss() < 0.5 * before


@pytest.mark.parametrize("w_name", list(WEIGHTINGS))
def test_every_weighting_is_finite_with_zero_terminal_snr_and_v(w_name):
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    loss_fn = DenoisingLoss(
        schedule, VPrediction(schedule), WEIGHTINGS[w_name], FixedTimesteps([999, 0, 500])
    )
    x0 = torch.randn(6, 4, 8, 8)
    # the network outputs 0, so the error is -target: a finite v-space error
    out = loss_fn(lambda x, c_noise, context: torch.zeros_like(x), x0)
    assert out.loss.isfinite().all() and (out.loss > 0).any()
    assert out.t.tolist() == [999, 0, 500] * 2


def test_edm_recipe_runs():
    loss_fn = DenoisingLoss(KarrasSchedule(), EDMPrecond(0.5), EDMWeighting(0.5), LogNormalSigmas())
    out = loss_fn(TinyNet(), torch.randn(8, 4, 8, 8) * 0.5, generator=torch.Generator().manual_seed(0))
    assert out.loss.shape == (8,) and out.loss.isfinite().all()


def test_ill_posed_combinations_are_refused():
    schedule = ScaledLinearSchedule(zero_terminal_snr=True)
    for weighting in [SNRPlusOne(), TruncatedSNR(), EDMWeighting(0.5)]:
        with pytest.raises(ValueError, match="not finite"):
            DenoisingLoss(schedule, EpsPrediction(schedule), weighting)
    with pytest.raises(ValueError, match="c_noise"):  # ln(sigma) / 4 is inf at SNR = 0
        DenoisingLoss(schedule, VPrediction(), MinSNR())
    DenoisingLoss(schedule, EpsPrediction(schedule), MinSNR())  # eps at SNR = 0 with weight 1: allowed
    DenoisingLoss(ScaledLinearSchedule(), EpsPrediction(), EDMWeighting())  # finite schedule: allowed


# --- configs ----------------------------------------------------------------------------------------------------------


def _yamls(group):
    return sorted((CONF / group).glob("*.yaml"))


def test_every_config_combination_builds_a_loss():
    groups = ["schedule", "parameterization", "weighting", "noise_levels"]
    nodes = {g: {f.stem: OmegaConf.load(f) for f in _yamls(g)} for g in groups}  # each file parsed once
    assert all(nodes.values())
    # The parameterization interpolates the schedule (`${..schedule}`), so each such pair is built in one tree; a
    # weighting or noise-level node holds only its own hyperparameters, so one instance serves every pair.
    built = {g: {name: instantiate(node) for name, node in nodes[g].items()} for g in groups[2:]}
    x0 = torch.randn(2, 4, 8, 8)
    for schedule, parameterization in itertools.product(nodes["schedule"], nodes["parameterization"]):
        cfg = OmegaConf.create({"diffusion": {"schedule": nodes["schedule"][schedule],
                                              "parameterization": nodes["parameterization"][parameterization]}})
        pair = instantiate(cfg.diffusion)
        for weighting, noise_levels in itertools.product(built["weighting"], built["noise_levels"]):
            names = [schedule, parameterization, weighting, noise_levels]
            try:
                loss_fn = DenoisingLoss(**pair, weighting=built["weighting"][weighting],
                                        noise_levels=built["noise_levels"][noise_levels])
            except ValueError as err:  # ill-posed at an open end (rectified flow reaches SNR 0 and inf): refused by name
                assert "not finite at the schedule's ends" in str(err) and schedule == "rectified_flow", err
                continue
            out = loss_fn(lambda x, c_noise, context: x, x0, generator=torch.Generator().manual_seed(0))
            assert out.loss.isfinite().all(), names
