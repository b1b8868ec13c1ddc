"""The timestep shift of SD3 (Esser et al. 2024, Sec. 5.3.2) and Flux (resolution dependent), as what both are: a
constant offset in log-SNR. Shifting t by s (t' = s t / (1 + (s - 1) t)) multiplies the VE sigma t / (1 - t) by s,
i.e. adds -2 ln s to log-SNR at every t; Flux's t' = e^mu / (e^mu + (1 / t - 1)) is the same with s = e^mu."""

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule


class ShiftedSchedule(NoiseSchedule):
    """`base` with log-SNR moved by a constant: logsnr(t) = base.logsnr(t) + logsnr_offset, i.e. every VE sigma times
    e^(-logsnr_offset / 2), on the same t range. A negative offset means more noise at every t (SD3's shift 3:
    -2 ln 3 = -2.2). Training noise levels drawn in t (uniform, logit-normal, mode) and ladders spaced in t or in sigma
    between the schedule's ends all move with it; ends at SNR 0 or inf stay there."""

    def __init__(self, base: NoiseSchedule, logsnr_offset: float):
        self.base, self.logsnr_offset = base, float(logsnr_offset)
        self.scale = math.exp(-self.logsnr_offset / 2)  # VE sigma factor s
        self.discrete = base.discrete
        self.t_min, self.t_max = base.t_min, base.t_max
        if base.discrete:  # the (T,) tables that spacing.discrete_sigmas reads
            self.num_timesteps = base.num_timesteps
            self.log_snrs = base.log_snrs + self.logsnr_offset
            self.sigmas = base.sigmas * self.scale

    def logsnr(self, t: Tensor) -> Tensor:
        return self.base.logsnr(t) + self.logsnr_offset

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return self.base.t_from_logsnr(logsnr - self.logsnr_offset)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.base.t_to_sigma(t) * self.scale  # the base's own (exact) sigma, scaled; 0 and inf stay

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.base.sigma_to_t(sigma / self.scale)

    def get_sigmas(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return self.base.get_sigmas(n, device) * self.scale  # the base's ladder (Karras' included), scaled

    def __repr__(self) -> str:
        return f"ShiftedSchedule({self.base!r}, logsnr_offset={self.logsnr_offset:.6g})"


@dataclass(frozen=True)
class TimestepShift:
    """SD3's fixed shift or Flux's resolution-dependent one, as a log-SNR offset (module docstring).

    Hold one per diffusion process (its fields are the checkpoint record: `asdict(shift)` / `TimestepShift(**d)`), and
    apply it the same way for training and for sampling at a given latent size:

        schedule = shift.apply(base_schedule, latent_h, latent_w, patch)    # ShiftedSchedule(base, offset)
        loss = DenoisingLoss(schedule, ...)                  # noise levels drawn in t see the shift
        sigmas = sampling_sigmas(schedule, steps, spacing)   # the sampling ladder sees the same shift

    `LogNormalSigmas` draws sigma itself (EDM) and so ignores any shift. The parameterization is never shifted: a
    flow model's c_noise is its actual noise level t (SD3 conditions on the shifted t * 1000).

    Args:
        shift: SD3's s > 0 (3.0 for SD3; 1.0 is no shift), or None for Flux's mu = ln s interpolated linearly in the
            image-token count (latent_h / patch) (latent_w / patch) between base_shift at base_seq_len and max_shift
            at max_seq_len (extrapolated outside, as Flux does; Flux: 0.5 at 256 tokens, 1.15 at 4096).
    """

    shift: float | None = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0 (1.0: no shift; SD3 uses 3.0) or None (Flux's), got {self.shift}")
        if self.shift is None and self.max_seq_len == self.base_seq_len:
            raise ValueError(f"max_seq_len must differ from base_seq_len, both are {self.base_seq_len}")

    @property
    def dynamic(self) -> bool:
        """True when the shift depends on the resolution (Flux)."""
        return self.shift is None

    def mu(self, seq_len: int) -> float:
        """ln s: ln(shift), or Flux's mu at `seq_len` image tokens (diffusers' calculate_shift)."""
        if self.shift is not None:
            return math.log(self.shift)
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (seq_len - self.base_seq_len)

    def for_resolution(self, latent_h: int | None = None, latent_w: int | None = None, patch: int = 1) -> float:
        """The log-SNR offset -2 mu at a latent size (latent cells, patch x patch cells per token); a fixed shift
        needs no size."""
        if self.shift is not None:
            return -2 * self.mu(0)
        if latent_h is None or latent_w is None:
            raise ValueError("a resolution-dependent shift (shift=None) needs latent_h and latent_w")
        if latent_h % patch or latent_w % patch:
            raise ValueError(f"latent size {latent_h}x{latent_w} is not a multiple of the patch size {patch}")
        return -2 * self.mu((latent_h // patch) * (latent_w // patch))

    def apply(self, schedule: NoiseSchedule, latent_h: int | None = None, latent_w: int | None = None,
              patch: int = 1) -> NoiseSchedule:
        """`schedule` shifted for this latent size: ShiftedSchedule(schedule, for_resolution(...)), or `schedule`
        itself when the offset is 0."""
        offset = self.for_resolution(latent_h, latent_w, patch)
        return schedule if offset == 0 else ShiftedSchedule(schedule, offset)

    def state_dict(self) -> dict:
        """Plain fields for a checkpoint; TimestepShift(**d) rebuilds it."""
        return asdict(self)
