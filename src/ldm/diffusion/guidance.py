"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper with guidance rescale (Lin et al. 2023, Sec. 3.4):
it binds the conditioning into a D(x, sigma) closure, so samplers never see prompts or guidance scales."""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# (x, sigma[B], cond) -> denoised; `cond` is a tensor or a NamedTuple of tensors / None (a backbone's Conditioning)
ConditionalDenoiser = Callable[[Tensor, Tensor, Any], Tensor]
Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma[B]) -> denoised


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4 and Algorithm 2; diffusers' rescale_noise_cfg): match the guided
    prediction's per-sample std to the conditional one's, then mix by `rescale` in [0, 1] (the paper's phi, 0.7)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _batch(cond: Any, batch: int) -> Any:
    """A batch-1 conditioning expanded (as views) to `batch`, field by field."""
    if cond is None:
        return None
    if isinstance(cond, tuple):
        return type(cond)(*(_batch(c, batch) for c in cond))
    return cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond


def _cat(a: Any, b: Any) -> Any:
    """Two conditionings as one batch, field by field (the cond and uncond halves of one forward)."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return type(a)(*(_cat(x, y) for x, y in zip(a, b)))
    return torch.cat([a, b])


def cfg_denoiser(
    denoiser: ConditionalDenoiser, cond: Any, uncond: Any, scale: float, rescale: float = 0.0
) -> Denoiser:
    """Classifier-free guidance D = D_u + scale (D_c - D_u) (Ho & Salimans 2022, Eq. 6) in x0 space, cond and uncond
    in one batched forward.

    Args:
        cond, uncond: the conditioning of the prompts and of the unconditional / negative prompt, batch B or 1: a
            tensor (B, L, D) or a NamedTuple of tensors (a backbone's `Conditioning`), concatenated field by field.
        scale: guidance weight; 1 returns the conditional denoiser exactly (one half-size forward), 0 the unconditional.
        rescale: Lin et al.'s phi in [0, 1]. It is applied to the guided x0 prediction (this denoiser's currency),
            not to the network's eps / v output as diffusers does; the two differ by the c_skip x term of D.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}")

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        batch = x.shape[0]
        if scale == 1.0:
            return denoiser(x, sigma, _batch(cond, batch))
        both = _cat(_batch(cond, batch), _batch(uncond, batch))  # batch 2B
        d_cond, d_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = d_uncond + scale * (d_cond - d_uncond)
        return rescale_guidance(guided, d_cond, rescale) if rescale > 0 else guided

    return denoise
