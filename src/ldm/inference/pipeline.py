"""Text-to-image, image variations (img2img) and inpainting from the three trained parts: prompts -> token states,
noise -> latents by a sampler over the classifier-free-guided denoiser, latents -> pixels by the autoencoder.

The formulas live in `ldm.diffusion`; this file only wires them. One `generate` covers the three modes, because
they differ only in where denoising starts (strength) and what is held fixed (mask).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ldm.data.buckets import make_buckets, nearest_bucket
from ldm.diffusion.diagnostics import STOCHASTIC_SAMPLERS, sampling_warning
from ldm.diffusion.guidance import cfg_denoiser
from ldm.diffusion.inpainting import known_region_denoiser, latent_mask, sample_repaint
from ldm.diffusion.options import check_options
from ldm.diffusion.parameterization import Denoiser
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.samplers import SAMPLER_ARGS, auto_sampler, get_sampler, sample_from_noise
from ldm.diffusion.spacing import SIGMA_SPACINGS, SPACINGS, sampling_sigmas, strength_sigmas
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.backbone import Backbone, Conditioning
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step, x, denoised latents)


@dataclass
class Generation:
    """What `generate` returns; `finite[i]` is False when image i holds NaN/Inf (never silently saved)."""

    images: Tensor  # (B, 3, H, W) in [-1, 1]
    latents: Tensor  # (B, c, H/f, W/f) normalized latents
    finite: Tensor  # (B,) bool


class LatentDiffusionPipeline(nn.Module):
    """The inference view of a stage-2 model: backbone + text encoder + autoencoder + the process it was trained on.

    Args:
        process: the training process: its schedule at the latent size (shift included) fixes the sampling
            ladder's ends, its parameterization turns the backbone's output into a denoised estimate.
        resolution: the training image size, the default height and width.
    """

    def __init__(self, backbone: Backbone, text_encoder: OpenCLIPTextEncoder, autoencoder: AutoencoderKL,
                 process: DiffusionProcess, resolution: int | None = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.weights = "raw"  # which backbone weights were loaded ("ema (N updates)" / "raw"), for the records
        self.backbone, self.text_encoder, self.autoencoder = backbone, text_encoder, autoencoder  # modes as given:
        self.process = process  # a training callback shares the module's parts and process
        self._checked: set[tuple] = set()  # sampler combinations already checked by _check_sampler
        self.denoiser = Denoiser(self.backbone, process.parameterization)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype of the backbone's weights: float32 unless `cast_weights` changed it."""
        return next(self.backbone.parameters()).dtype

    def cast_weights(self, dtype: torch.dtype) -> LatentDiffusionPipeline:
        """Keep the backbone's, text encoder's and autoencoder's weights in `dtype` (bfloat16 / float16), in place:
        what diffusers' `torch_dtype` does, half the memory, and no per-op weight casts under autocast (diffusers
        sampled 1.42x faster so than under autocast on an H200, bench/RESULTS.md). Every forward then runs in that
        dtype; the
        latents, the sampler's arithmetic, the latent statistics (kept in float32: 0.18215 in bf16 would shift
        every latent by 0.3%) and the images stay float32. For inference pipelines only: a training module's
        sampling callback shares its parts."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weights can be float32, bfloat16 or float16, got {dtype}")
        self.backbone.to(dtype)
        self.text_encoder.to(dtype)
        for param in self.autoencoder.parameters():
            param.data = param.data.to(dtype)
        return self

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (the autoencoder's f), times the backbone's size multiple."""
        return self.autoencoder.downsample_factor * self.backbone.size_multiple

    def check_size(self, height: int, width: int) -> None:
        """Refuse sizes the autoencoder or the backbone cannot take, naming the nearest valid ones."""
        m = self.latent_factor
        if height < m or width < m or height % m or width % m:
            near = lambda v: max(m, round(v / m) * m)  # noqa: E731
            raise ValueError(
                f"height and width must be positive multiples of {m} (autoencoder factor "
                f"{self.autoencoder.downsample_factor} x {type(self.backbone).__name__} size multiple "
                f"{m // self.autoencoder.downsample_factor}); "
                f"got {height}x{width}, try {near(height)}x{near(width)}.")

    def aspect_size(self, aspect: str, area: int | None = None) -> tuple[int, int]:
        """(height, width) for an aspect ratio "W:H" (e.g. "16:9") at about `area` pixels (default: the training
        resolution squared): the nearest aspect-ratio bucket the model can take (ldm.data.buckets)."""
        try:
            w, h = (float(v) for v in aspect.split(":"))
            ratio = w / h
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"aspect must be 'W:H' with positive numbers, e.g. 16:9, got {aspect!r}") from None
        if not ratio > 0:
            raise ValueError(f"aspect must be 'W:H' with positive numbers, e.g. 16:9, got {aspect!r}")
        side = round(math.sqrt(area)) if area else self.default_size
        buckets = make_buckets(max(side, self.latent_factor), self.latent_factor, 2 * max(ratio, 1 / ratio))
        return nearest_bucket(round(ratio * 1000), 1000, buckets)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> Conditioning:
        """The prompts' conditioning (token states (B, L, D), pooled, mask); "" is the unconditional prompt."""
        return self.text_encoder.encode(list(prompts)).to(self.device)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalized latents, the posterior mean (deterministic)."""
        z = self.autoencoder.encode(images.to(self.device, self.weights_dtype)).mode()
        return self.autoencoder.normalize(z.float())

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalized latents -> images in [-1, 1] (clamped), float32."""
        z = self.autoencoder.denormalize(latents.float()).to(self.weights_dtype)
        return self.autoencoder.decode(z).float().clamp(-1, 1)

    def sigmas(self, steps: int, spacing: str = "auto", latent_size: tuple[int, int] | None = None,
               sampler: str | None = None) -> Tensor:
        """The sampling ladder of the process's schedule at `latent_size` (h, w): the shift training used there;
        "auto" is the default ladder for `sampler` (spacing.auto_spacing)."""
        schedule = self.process.schedule(*latent_size) if latent_size else self.process.schedule()
        return sampling_sigmas(schedule, steps, spacing, sampler=sampler, device=self.device)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        negative_prompt: str | Sequence[str] = "",
        sampler: str = "auto",
        steps: int = 30,
        spacing: str = "auto",
        guidance: float = 5.0,
        guidance_rescale: float = 0.0,
        guidance_method: str = "cfg",
        guidance_options: Mapping[str, Any] | None = None,
        guidance_interval: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
        repaint: int = 0,
        precision: Precision = "fp32",
        callback: StepCallback | None = None,
        sampler_options: Mapping[str, Any] | None = None,
    ) -> Generation:
        """One image per (prompt, seed); the noise of image i depends only on seeds[i] (a CPU generator), so the
        same seed gives the same image at any batch size and on any device (up to kernel rounding).

        Args:
            image: (B or 1, 3, H, W) in [-1, 1]: img2img starts from it noised to `strength`; with `mask`, inpaint.
            strength: in (0, 1]; the fraction of the ladder run from the noised image (1: start from noise).
            mask: (B or 1, 1, H, W), 1 = generate, 0 = keep `image` (needs `image`).
            repaint: 0 blends the known latents into any sampler's steps; R >= 1 runs RePaint with R resamplings
                per step (DDPM steps; `sampler` is then ignored).
            sampler_options: keyword options of the sampler function (eta, s_noise, order).
            guidance_method, guidance_options: a rule of ldm.diffusion.guidance.GUIDANCE_METHODS ("cfg", "apg",
                "cfg_zero_star") and its options; guidance_interval: [sigma_lo, sigma_hi] where guidance applies.
            (ldm.inference.sampling_options.SamplingOptions checks and holds all of these for the CLIs.)

        A sampler x ladder x steps combination that keeps the variance of unit Gaussian data off by more than 5%
        (ldm.diffusion.diagnostics, in closed form) warns once, naming a better combination.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sampler = auto_sampler(steps) if sampler == "auto" else sampler  # per step count (samplers.auto_sampler)
        sample_fn = get_sampler(sampler)
        if mask is not None and image is None:
            raise ValueError("inpainting needs the image to keep: pass image= with mask=")
        if image is not None:
            height, width = image.shape[-2:]
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)
        batch, f = len(prompts), self.autoencoder.downsample_factor
        shape = (batch, self.autoencoder.latent_channels, height // f, width // f)

        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        cond, uncond = self.embed(prompts), self.embed(negatives)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]  # CPU: device-independent noise
        noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(self.device)

        options = dict(sampler_options or {})
        check_options(sample_fn, options, f"sampler {sampler!r}", skip=SAMPLER_ARGS)
        if mask is None or repaint == 0:  # RePaint runs its own DDPM steps, not `sampler`
            self._check_sampler(sampler, spacing, steps, shape[-2:], options)
        sigmas = strength_sigmas(self.sigmas(steps, spacing, shape[-2:], sampler), strength)
        denoiser = cfg_denoiser(self._autocast(self.denoiser, precision), cond, uncond, guidance, guidance_rescale,
                                method=guidance_method, interval=guidance_interval, **(guidance_options or {}))
        # sample_from_noise: x = x0 + sigma_0 noise, and a first step from pure noise when sigma_0 is inf (flow)
        run = partial(sample_from_noise, sample_fn, noise=noise, sigmas=sigmas, generator=generators,
                      callback=callback, **options)
        if image is None:
            latents = run(denoiser)
        else:
            known = self._batch(self.encode(self._check_image(image)), batch)
            if mask is None:
                latents = run(denoiser, x0=known)
            else:
                m = self._batch(latent_mask(self._check_mask(mask, height, width), shape[-2:]), batch)
                if repaint > 0:
                    latents = sample_repaint(denoiser, known + noise * sigmas[0], sigmas, known=known, mask=m,
                                             resample=repaint, generator=generators, callback=callback)
                else:
                    latents = run(known_region_denoiser(denoiser, known, m), x0=known)
        images = self.decode(latents.float())
        finite = latents.flatten(1).isfinite().all(1) & images.flatten(1).isfinite().all(1)
        return Generation(images, latents, finite)

    @property
    def default_size(self) -> int:
        """The training resolution when known (set by the loader), else 64 latent cells."""
        return self.resolution or 64 * self.autoencoder.downsample_factor

    # ------------------------------------------------------------------ helpers
    def _check_sampler(self, sampler: str, spacing: str, steps: int, latent_size: tuple[int, int],
                       options: dict[str, Any]) -> None:
        """Warn once per combination when it is poor on Gaussian data (see `generate`); the alternatives are the
        same sampler on every ladder and unipc (dpmpp_2m_sde for a stochastic sampler) on every ladder."""
        key = (sampler, spacing, steps, tuple(latent_size), tuple(sorted(options.items())))
        if key in self._checked:
            return
        self._checked.add(key)
        fallback = "dpmpp_2m_sde" if sampler in STOCHASTIC_SAMPLERS else "unipc"
        alternatives = [(s, p) for s in dict.fromkeys((sampler, fallback)) for p in SPACINGS + SIGMA_SPACINGS]
        def ladder(spacing: str, n: int) -> Tensor:
            return self.sigmas(n, spacing, latent_size, sampler).cpu()

        message = sampling_warning(sampler, spacing, steps, ladder, alternatives=alternatives, **options)
        if message is not None:
            warnings.warn(message, stacklevel=4)  # the caller of generate (past torch.no_grad's wrapper)

    def _autocast(self, denoiser: Denoiser, precision: Precision) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
        """The denoiser under autocast to `precision`, or to the weights' dtype when `cast_weights` lowered it."""
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        dtype = DTYPES[precision]
        if self.weights_dtype != torch.float32:
            if precision != "fp32" and dtype != self.weights_dtype:
                raise ValueError(f"precision={precision} with {self.weights_dtype} weights: the weights fix the "
                                 "precision; leave it at fp32 or match them")
            dtype = self.weights_dtype
        if dtype == torch.float32:
            return denoiser
        device_type = self.device.type

        def run(x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
            with torch.autocast(device_type, dtype=dtype):
                return denoiser(x, sigma, cond).float()

        return run

    @staticmethod
    def _check_image(image: Tensor) -> Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return image

    def _check_mask(self, mask: Tensor, height: int, width: int) -> Tensor:
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(f"mask must be (B, 1, {height}, {width}) like the image, got {tuple(mask.shape)}")
        return mask.to(self.device)

    @staticmethod
    def _batch(t: Tensor, batch: int) -> Tensor:
        if t.shape[0] == batch:
            return t
        if t.shape[0] != 1:
            raise ValueError(f"expected a batch of 1 or {batch}, got {t.shape[0]}")
        return t.expand(batch, *t.shape[1:])
