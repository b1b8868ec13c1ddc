"""The sampling settings of one generation, shared by sample.py, evaluate.py and the sampling callbacks: the
`conf/sampling/` group holds their keys, this class checks them at start-up and hands them to `pipeline.generate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.diffusion.guidance import check_interval, guidance_rule
from ldm.diffusion.options import check_options
from ldm.diffusion.samplers import FEW_STEPS, SAMPLER_ARGS, SAMPLERS, auto_sampler, get_sampler
from ldm.diffusion.spacing import SIGMA_SPACINGS, SPACINGS

PRECISIONS = ("fp32", "bf16", "fp16")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _set(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options with the unset (null) ones dropped: the config lists every option, null meaning the default."""
    return {k: v for k, v in (_plain(options) or {}).items() if v is not None}


@dataclass(frozen=True)
class SamplingOptions:
    """Sampler, ladder and guidance of a generation (see conf/sampling/default.yaml for each key's meaning).

    Args:
        sampler: a key of ldm.diffusion.samplers.SAMPLERS or "auto" (per step count: samplers.auto_sampler).
        spacing: a ladder of ldm.diffusion.spacing or "auto" (the default for the sampler and schedule).
        sampler_options: keyword options of the sampler function (eta, s_noise, order); null ones are dropped.
        guidance: the guidance scale w (1: none with method cfg).
        guidance_method: a key of ldm.diffusion.guidance.GUIDANCE_METHODS; `guidance_options` are its options.
        guidance_interval: [sigma_lo, sigma_hi]: guide only there (Kynkaanniemi et al. 2024), or None.
        guidance_rescale: Lin et al.'s phi in [0, 1].
        precision: autocast of the denoiser, fp32 / bf16 / fp16.
    """

    sampler: str = "auto"
    steps: int = 30
    spacing: str = "auto"
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    guidance: float = 5.0
    guidance_method: str = "cfg"
    guidance_options: Mapping[str, Any] = field(default_factory=dict)
    guidance_interval: tuple[float, float] | None = None
    guidance_rescale: float = 0.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize once, here
        set_(self, "sampler_options", _set(self.sampler_options))
        set_(self, "guidance_options", _set(self.guidance_options))
        set_(self, "guidance_interval", check_interval(_plain(self.guidance_interval)))
        if self.sampler != "auto":
            get_sampler(self.sampler)  # an unknown name lists the valid ones
        if int(self.steps) < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.spacing != "auto" and self.spacing not in SPACINGS + SIGMA_SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; expected auto or one of {SPACINGS + SIGMA_SPACINGS}")
        for name in dict.fromkeys([self.resolved_sampler, *(
                [auto_sampler(1), auto_sampler(FEW_STEPS)] if self.sampler == "auto" else [])]):
            check_options(SAMPLERS[name], self.sampler_options, f"sampler {name!r}", skip=SAMPLER_ARGS)
        guidance_rule(self.guidance_method, float(self.guidance), **self.guidance_options)  # names and options
        if not 0.0 <= float(self.guidance_rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig | None, **overrides: Any) -> SamplingOptions:
        """From a config node holding (some of) the group's keys; other keys (prompt, ckpt, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: _plain(cfg[k]) for k in names if cfg is not None and k in cfg}  # reads no other key
        return cls(**{**values, **overrides})

    @property
    def resolved_sampler(self) -> str:
        """The sampler that runs: "auto" resolved for `steps`."""
        return auto_sampler(int(self.steps)) if self.sampler == "auto" else self.sampler

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `LatentDiffusionPipeline.generate` (plain Python values)."""
        return {"sampler": self.sampler, "steps": int(self.steps), "spacing": self.spacing,
                "sampler_options": dict(self.sampler_options), "guidance": float(self.guidance),
                "guidance_method": self.guidance_method, "guidance_options": dict(self.guidance_options),
                "guidance_interval": self.guidance_interval, "guidance_rescale": float(self.guidance_rescale),
                "precision": self.precision}

    def record(self) -> dict[str, Any]:
        """The settings as json-ready values (the interval as a list), for the json beside an image or a metric."""
        kwargs = self.generate_kwargs()
        interval = kwargs["guidance_interval"]
        return {**kwargs, "guidance_interval": list(interval) if interval else None}
