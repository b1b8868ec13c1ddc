"""Noise schedules reduced to one function, schedule time t -> log-SNR: discrete DDPM beta schedules (Ho et al. 2020;
Nichol & Dhariwal 2021) with zero-terminal-SNR rescaling (Lin et al. 2023, Algorithm 1), EDM's sigma(t) (Karras et al.
2022, Eq. 5), the shifted cosine of simple diffusion (Hoogeboom et al. 2023) and rectified flow (Liu et al. 2022;
Esser et al. 2024); alpha, sigma and SNR derive from it."""

import math
from typing import ClassVar

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------------------
# log-SNR <-> VP (alpha, sigma) <-> VE sigma. VP: x = alpha * x0 + sigma * eps, alpha**2 + sigma**2 = 1. VE: x = x0 +
# sigma * eps with sigma_ve = sigma_vp / alpha. At SNR = 0 the VE sigma is inf while alpha, sigma = (0, 1) stay finite.


def vp_from_logsnr(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr))); exact at SNR = 0 -> (0, 1) and inf -> (1, 0)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def logsnr_from_sigma(sigma: Tensor) -> Tensor:
    """VE sigma -> log-SNR = -2 ln sigma (sigma = inf -> -inf, sigma = 0 -> inf)."""
    return -2 * sigma.log()


def sigma_from_logsnr(logsnr: Tensor) -> Tensor:
    """log-SNR -> VE sigma = exp(-logsnr / 2)."""
    return torch.exp(-logsnr / 2)


def vp_from_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE sigma -> VP (alpha, sigma) = (1, sigma) / sqrt(1 + sigma**2), finite for sigma = inf."""
    return vp_from_logsnr(logsnr_from_sigma(sigma))


# ---------------------------------------------------------------------------------------------------------------------
# Discrete beta schedules, in float64: (T,) betas.


def betas_linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear betas (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def betas_scaled_linear(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Betas linear in sqrt(beta): the latent/Stable Diffusion schedule (Rombach et al. 2022)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_cosine(num_timesteps: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Cosine alpha_bar (Nichol & Dhariwal 2021, Eq. 17), betas clipped at max_beta (diffusers' squaredcos_cap_v2)."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def betas_sigmoid(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Sigmoid betas (Xu et al. 2022, GeoDiff): sigmoid(linspace(-6, 6)) scaled into [beta_start, beta_end]."""
    ramp = torch.sigmoid(torch.linspace(-6, 6, num_timesteps, dtype=torch.float64))
    return ramp * (beta_end - beta_start) + beta_start


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, Eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has SNR = 0 and the first is unchanged (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2  # the last entry is exactly 0
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


# ---------------------------------------------------------------------------------------------------------------------
# Sampling ladders.


def sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str | None = None
) -> Tensor:
    """Karras et al. (2022), Eq. 5: n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (n + 1,)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules as objects: each defines t -> log-SNR and its inverse; everything else is derived here, once.


class NoiseSchedule:
    """t in [t_min, t_max] -> log-SNR (decreasing); alpha, sigma (VP), sigma (VE) and SNR all follow from it."""

    discrete: ClassVar[bool] = False
    t_min: float = 0.0
    t_max: float = 1.0

    def logsnr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        raise NotImplementedError

    def snr(self, t: Tensor) -> Tensor:
        return self.logsnr(t).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """VP (alpha, sigma) at t; (0, 1) at a zero terminal SNR."""
        return vp_from_logsnr(self.logsnr(t))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """VE sigma at t (inf at a zero terminal SNR)."""
        return sigma_from_logsnr(self.logsnr(t))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """VE sigma -> t (float); for discrete schedules round() gives the nearest step in log-sigma."""
        return self.t_from_logsnr(logsnr_from_sigma(sigma))

    def get_sigmas(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """n VE sigmas at t evenly spaced from t_max to t_min, then 0 (k-diffusion's get_sigmas); where t_min is
        already sigma = 0 (rectified flow's t = 0), n + 1 evenly spaced t instead, so no step starts at sigma = 0. The
        first is inf at a zero terminal SNR: run that ladder with `samplers.sample_from_noise`."""
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        ends_at_zero = self.t_to_sigma(torch.tensor([self.t_min], dtype=torch.float64)).item() == 0
        t = torch.linspace(self.t_max, self.t_min, n + ends_at_zero, dtype=torch.float64)
        sigmas = self.t_to_sigma(t).to(device=device, dtype=torch.float32)
        return sigmas if ends_at_zero else torch.cat([sigmas, sigmas.new_zeros(1)])  # (n + 1,)


_ZERO_SNR_NEG_LOGSNR = math.log((1 - 2**-24) / 2**-24)  # -log-SNR where diffusers puts a zero terminal SNR


class DiscreteSchedule(NoiseSchedule):
    """T-step DDPM schedule: t is the step index; fractional t interpolates log-SNR (= log-sigma, as k-diffusion's
    DiscreteSchedule). `alphas_cumprod`, `log_snrs`, `snrs` and `sigmas` are (T,) float64, all derived after rescaling."""

    discrete: ClassVar[bool] = True

    def __init__(self, betas: Tensor, zero_terminal_snr: bool = False):
        betas = betas.to(torch.float64)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        # every derived table comes from log-SNR after rescaling; -inf / inf at a zero terminal SNR
        self.log_snrs = self.alphas_cumprod.log() - (-self.alphas_cumprod).log1p()
        self.snrs = self.log_snrs.exp()
        self.sigmas = sigma_from_logsnr(self.log_snrs)  # VE; inf at a zero terminal SNR
        self.num_timesteps = len(betas)
        self.t_max = self.num_timesteps - 1
        self._tables: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        # one float32 copy per device, so a training step never copies the table host -> device
        if device not in self._tables:
            self._tables[device] = self.log_snrs.to(device, torch.float32)
        return self._tables[device]

    def logsnr(self, t: Tensor) -> Tensor:
        table = self._table(t.device)
        if not t.is_floating_point():
            return table[t]
        t = t.clamp(0, self.t_max)
        low = t.floor().long().clamp(max=self.t_max - 1)
        w = t - low
        lo, hi = table[low], table[low + 1]
        # linear in log-SNR, but exact at the knots so a -inf end never meets 0 * inf
        return torch.where(w == 0, lo, torch.where(w == 1, hi, lo + w * (hi - lo)))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of logsnr(t), clamped to [0, T - 1]; exact at the knots (t_from_logsnr(logsnr(k)) == k)."""
        x = -logsnr.to(torch.float32)  # = 2 ln sigma, increasing in t
        table = -self._table(logsnr.device)  # (T,) increasing, +inf at a zero terminal SNR
        # An infinite last knot would pin every finite sigma above the previous knot to t = T - 2; place it where
        # diffusers does (alphas_cumprod = 2**-24, sigma ~ 4096), so samplers' finite stand-in for sigma = inf
        # maps to t = T - 1, as it does in diffusers.
        table = torch.where(torch.isinf(table), torch.full_like(table, _ZERO_SNR_NEG_LOGSNR), table)
        # table[idx - 1] < x <= table[idx]
        idx = torch.searchsorted(table, x.contiguous()).clamp(1, self.t_max)
        lo, hi = table[idx - 1], table[idx]
        w = ((x - lo) / (hi - lo)).nan_to_num(nan=1.0).clamp(0, 1)  # nan only from inf / inf: x = hi = inf
        return idx - 1 + w


class LinearSchedule(DiscreteSchedule):
    """Linear betas (Ho et al. 2020)."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ):
        super().__init__(betas_linear(num_timesteps, beta_start, beta_end), zero_terminal_snr)


class ScaledLinearSchedule(DiscreteSchedule):
    """Betas linear in sqrt(beta), Stable Diffusion's schedule (Rombach et al. 2022)."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ):
        super().__init__(betas_scaled_linear(num_timesteps, beta_start, beta_end), zero_terminal_snr)


class CosineSchedule(DiscreteSchedule):
    """Cosine alpha_bar with betas capped at max_beta (Nichol & Dhariwal 2021)."""

    def __init__(self, num_timesteps: int = 1000, max_beta: float = 0.999, zero_terminal_snr: bool = False):
        super().__init__(betas_cosine(num_timesteps, max_beta), zero_terminal_snr)


class SigmoidSchedule(DiscreteSchedule):
    """Sigmoid betas (Xu et al. 2022, GeoDiff)."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ):
        super().__init__(betas_sigmoid(num_timesteps, beta_start, beta_end), zero_terminal_snr)


class KarrasSchedule(NoiseSchedule):
    """EDM's sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho on t in [0, 1]
    (Karras et al. 2022, Eq. 5, with t running from low to high noise)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self._lo, self._hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)

    def logsnr(self, t: Tensor) -> Tensor:
        return -2 * self.rho * torch.log(self._lo + t * (self._hi - self._lo))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return (torch.exp(-logsnr / (2 * self.rho)) - self._lo) / (self._hi - self._lo)

    def get_sigmas(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return sigmas_karras(n, self.sigma_min, self.sigma_max, self.rho, device)


class ShiftedCosineSchedule(NoiseSchedule):
    """Cosine log-SNR -2 ln tan(pi t / 2), clipped to [logsnr_min, logsnr_max], then shifted by
    2 ln(base_resolution / resolution) (Hoogeboom et al. 2023, simple diffusion, Sec. 3.1)."""

    def __init__(
        self,
        resolution: int = 64,
        base_resolution: int = 64,
        logsnr_min: float = -15.0,
        logsnr_max: float = 15.0,
    ):
        self.shift = 2 * math.log(base_resolution / resolution)
        # the angles where the unshifted log-SNR -2 ln tan(angle) is logsnr_max and logsnr_min
        self._t0 = math.atan(math.exp(-0.5 * logsnr_max))
        self._t1 = math.atan(math.exp(-0.5 * logsnr_min))

    def logsnr(self, t: Tensor) -> Tensor:
        return -2 * torch.tan(self._t0 + t * (self._t1 - self._t0)).log() + self.shift

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        angle = torch.atan(torch.exp(-(logsnr - self.shift) / 2))
        return (angle - self._t0) / (self._t1 - self._t0)


class RectifiedFlow(NoiseSchedule):
    """x_t = (1 - t) x0 + t eps on t in [t_min, t_max] (Liu et al. 2022; Esser et al. 2024, Eq. 3): log-SNR
    2 ln((1 - t) / t), VE sigma t / (1 - t) and x_ve = x_t / (1 - t); t = 1 is pure noise (SNR 0, sigma inf), t = 0
    the data (sigma 0). Pair with FlowPrediction; SD3's and Flux's shifts are `shift.TimestepShift`."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def logsnr(self, t: Tensor) -> Tensor:
        return 2 * (torch.log1p(-t) - torch.log(t))  # inf at t = 0, -inf at t = 1

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-logsnr / 2)  # t = sigma / (1 + sigma), exact at both ends

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t / (1 - t)  # directly, not through exp(-logsnr / 2): exact to rounding, inf at t = 1

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + 1 / sigma)  # = sigma / (1 + sigma), and 1 at sigma = inf, 0 at sigma = 0

    def __repr__(self) -> str:
        return f"RectifiedFlow(t_min={self.t_min}, t_max={self.t_max})"
