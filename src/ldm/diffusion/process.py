"""The diffusion process a model is trained on, as one object: the noise schedule, the network parameterization and
the timestep shift. The training module owns it and saves its description in every checkpoint; the loss, validation,
the sampling callbacks, `sample.py` and `evaluate.py` all take the schedule from it at the latent size in hand, so
a resolution-dependent shift (Flux) gives training and sampling the same noise levels.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldm.diffusion.parameterization import ModelFn, Parameterization, append_dims
from ldm.diffusion.schedules import NoiseSchedule, vp_from_logsnr
from ldm.diffusion.shift import TimestepShift


class DiffusionProcess:
    """Schedule + parameterization + shift.

    Args:
        patch_size: latent cells per backbone token along each side, for Flux's sequence-length shift (a DiT with
            patch 2: 2; a UNet: 1); ignored by a fixed or no shift.
    """

    def __init__(self, schedule: NoiseSchedule, parameterization: Parameterization,
                 shift: TimestepShift | None = None, patch_size: int = 1) -> None:
        self.base_schedule, self.parameterization = schedule, parameterization
        self.shift = shift if shift is not None else TimestepShift(shift=1.0)
        self.patch_size = patch_size

    def schedule(self, latent_h: int | None = None, latent_w: int | None = None) -> NoiseSchedule:
        """The schedule at a latent size: the base schedule moved by the shift (the base itself without one)."""
        return self.shift.apply(self.base_schedule, latent_h, latent_w, self.patch_size)

    @staticmethod
    def noised(x0: Tensor, noise: Tensor, logsnr: Tensor) -> Tensor:
        """x = alpha x0 + sigma eps at log-SNR `logsnr` (B,), VP form (finite at SNR 0)."""
        alpha, sigma = (append_dims(c, x0.ndim).to(x0.dtype) for c in vp_from_logsnr(logsnr))
        return alpha * x0 + sigma * noise

    def denoise_vp(self, model_fn: ModelFn, x: Tensor, logsnr: Tensor, cond: Any = None) -> Tensor:
        """D = c_skip x + c_out F(c_in x, c_noise, cond) on a VP-form x at `logsnr` (B,): validation's x0 estimate."""
        alpha, sigma = (append_dims(c, x.ndim).to(x.dtype) for c in vp_from_logsnr(logsnr))
        c_skip, c_out, c_in = self.parameterization.scalings_vp(alpha, sigma)
        return c_skip * x + c_out * model_fn(c_in * x, self.parameterization.c_noise(logsnr), cond)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records, and what a loaded model is checked against: the class and plain settings of
        the schedule and parameterization, and the shift's fields."""
        return {"schedule": _describe(self.base_schedule), "parameterization": _describe(self.parameterization),
                "shift": self.shift.state_dict(), "patch_size": self.patch_size}


def _describe(obj: object) -> str:
    """`ClassName(field=value, ...)` over the plain (number, string, bool) attributes; a nested schedule likewise."""
    parts = [f"{k}={v!r}" for k, v in sorted(vars(obj).items())
             if not k.startswith("_") and (v is None or isinstance(v, int | float | str))]
    if isinstance(getattr(obj, "schedule", None), NoiseSchedule):
        parts.append(f"schedule={_describe(obj.schedule)}")
    return f"{type(obj).__name__}({', '.join(parts)})"
