"""Inpainting with an ordinary (not inpainting-trained) denoiser: keep the known region and let the sampler fill
the rest, either by pinning the known region in the denoiser (works with every sampler) or by RePaint's resampling
(Lugmayr et al. 2022). Masks are 1 where content is generated and 0 where the input is kept, as in diffusers."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.samplers import Denoiser, Generator, StepCallback, _noise, _steps


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """Pixel mask (B, 1, H, W) in [0, 1] -> latent mask (B, 1, h, w) in {0, 1}: a latent cell is generated when any
    pixel it covers is (max-pooling), so every kept cell is entirely known."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    return (F.adaptive_max_pool2d(mask.float(), latent_size) > 0.5).float()


def known_region_denoiser(denoiser: Denoiser, known: Tensor, mask: Tensor) -> Denoiser:
    """D'(x, sigma) = mask D(x, sigma) + (1 - mask) known: the denoised estimate is the known latent wherever it is
    known. For every sampler in `samplers` this keeps x = known + sigma n there (n the sampler's own noise), so the
    kept region follows exactly the noising path of the input, the blending of known latents at every step that
    diffusers' inpainting pipelines do after each `step()`, without a sampler-specific hook."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        return mask * denoiser(x, sigma) + (1 - mask) * known

    return denoise


@torch.no_grad()
def sample_repaint(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    known: Tensor,
    mask: Tensor,
    resample: int = 10,
    generator: Generator = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1, jump length 1) in VE form: every step is a DDPM posterior step for
    the generated region and a fresh forward sample known + sigma' z for the kept one; the merged x is pushed back to
    sigma with noise and the step repeated `resample` times so both regions harmonise. 1 means no resampling."""
    if resample < 1:
        raise ValueError(f"resample must be >= 1, got {resample}")
    for i, (sigma, sigma_next) in enumerate(_steps(sigmas)):
        for u in range(resample):
            denoised = denoiser(x, x.new_full((x.shape[0],), sigma))
            if callback is not None and u == 0:
                callback(i, x, mask * denoised + (1 - mask) * known)
            ratio = (sigma_next / sigma) ** 2
            x_gen = denoised + ratio * (x - denoised)  # posterior mean of q(x' | x, x0 = D(x)), Ho et al. Eq. 7
            x_known = known
            if sigma_next > 0:
                x_gen = x_gen + _noise(x, generator) * sigma_next * (1 - ratio) ** 0.5
                x_known = known + _noise(x, generator) * sigma_next
            x = mask * x_gen + (1 - mask) * x_known
            if u < resample - 1 and sigma_next > 0:  # back to sigma: q(x | x') adds variance sigma^2 - sigma'^2
                x = x + _noise(x, generator) * (sigma**2 - sigma_next**2) ** 0.5
    return x

