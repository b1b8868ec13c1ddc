"""Loss weightings lambda(SNR) defined on the x0-space MSE, as EDM's lambda(sigma) (Karras et al. 2022, Eq. 8) and
Kingma & Gao (2023); each returns the equivalent weight lambda * c_out^2 on the MSE of the network output F. SD3's
(Esser et al. 2024) rectified-flow variants are FlowVelocity (their plain velocity MSE) with a timestep density from
`noise_levels` (logit-normal, mode, cosmap), which is how they define them."""

import math

import torch
from torch import Tensor
from torch.nn.functional import softplus

from ldm.diffusion.parameterization import Parameterization

# Stand-in for log-SNR = +-inf. Every term below is asymptotically linear in log-SNR, so at +-1000 each has reached its
# limit (exp(-1000) == 0) while inf - inf never occurs; a weight whose true limit is infinite still comes out as inf.
_LOGSNR_INF = 1000.0


class Weighting:
    """lambda(SNR) on ||D - x0||^2; __call__ gives the weight on ||F - F_target||^2 for a parameterization."""

    def log_weight(self, logsnr: Tensor) -> Tensor:
        """ln lambda as a function of log-SNR."""
        raise NotImplementedError

    def __call__(self, logsnr: Tensor, parameterization: Parameterization) -> Tensor:
        """(B,) log-SNR (may be +-inf) -> (B,) weight on the F-space MSE, computed in log space to keep its limits."""
        logsnr = logsnr.float().clamp(-_LOGSNR_INF, _LOGSNR_INF)
        return torch.exp(self.log_weight(logsnr) + parameterization.log_c_out_squared(logsnr))


class Uniform(Weighting):
    """Weight 1 on the network-output MSE: L_simple of Ho et al. (2020) for whatever F predicts."""

    def __call__(self, logsnr: Tensor, parameterization: Parameterization) -> Tensor:
        return torch.ones_like(logsnr, dtype=torch.float32)


class SNR(Weighting):
    """lambda = SNR (Kingma et al. 2021): the eps-MSE."""

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return logsnr


class SNRPlusOne(Weighting):
    """lambda = SNR + 1 (Salimans & Ho 2022, "SNR+1"): the v-MSE."""

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return softplus(logsnr)


class TruncatedSNR(Weighting):
    """lambda = max(SNR, 1) (Salimans & Ho 2022, "truncated SNR")."""

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return logsnr.clamp(min=0)


class MinSNR(Weighting):
    """lambda = min(SNR, gamma) (Hang et al. 2023): min(SNR, gamma) / SNR on eps, / (SNR + 1) on v."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return logsnr.clamp(max=math.log(self.gamma))


class SoftMinSNR(Weighting):
    """lambda = 1 / (1 / SNR + 1 / gamma) (Crowson et al. 2024, HDiT; their gamma = 1 / sigma_data^2)."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = gamma

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return -torch.logaddexp(-logsnr, torch.full_like(logsnr, -math.log(self.gamma)))


class EDMWeighting(Weighting):
    """lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = SNR + 1 / sigma_data^2 (Karras et al. 2022)."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return torch.logaddexp(logsnr, torch.full_like(logsnr, -2 * math.log(self.sigma_data)))


class FlowVelocity(Weighting):
    """lambda = 1 / t^2 = (1 + sqrt(SNR))^2 with t = 1 / (1 + sqrt(SNR)): the rectified-flow velocity MSE
    ||(x_t - D) / t - (eps - x0)||^2 (Esser et al. 2024, Sec. 2), for any parameterization; with FlowPrediction it
    is weight 1, the same as Uniform."""

    def log_weight(self, logsnr: Tensor) -> Tensor:
        return 2 * softplus(logsnr / 2)
