"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022) with its 2023-2025 refinements: guidance rescale
(Lin et al. 2023), a guidance interval (Kynkaanniemi et al. 2024), APG (Sadat et al. 2024) and CFG-Zero* (Fan et al.
2025). The wrapper binds the conditioning into a D(x, sigma) closure, so samplers never see prompts or guidance."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ldm.diffusion.options import check_options

# (x, sigma[B], cond) -> denoised; `cond` is a tensor or a NamedTuple of tensors / None (a backbone's Conditioning)
ConditionalDenoiser = Callable[[Tensor, Tensor, Any], Tensor]
Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma[B]) -> denoised


class GuidanceRule(Protocol):
    """How one evaluation's conditional and unconditional x0 predictions combine into the guided one. A rule is built
    per generation (`GUIDANCE_METHODS[name](scale, **options)`), so it may keep state across steps (APG's momentum)."""

    def __call__(self, d_cond: Tensor, d_uncond: Tensor, x: Tensor, sigma: Tensor) -> Tensor: ...


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _dims(t: Tensor) -> list[int]:
    return list(range(1, t.ndim))


# ------------------------------------------------------------------------------------------------ rules
def cfg(scale: float) -> GuidanceRule:
    """Classifier-free guidance D = D_u + w (D_c - D_u) (Ho & Salimans 2022, Eq. 6)."""
    return lambda d_cond, d_uncond, x, sigma: d_uncond + scale * (d_cond - d_uncond)


def apg(scale: float, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0) -> GuidanceRule:
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1), in x0 space as the paper applies it:
    D = D_c + (w - 1) (u_perp + eta u_par), where u = D_c - D_u after a running average with `momentum` (the paper
    uses a negative one) and a clip of its per-sample L2 norm to `norm_threshold` (0: off), split into the parts
    parallel and orthogonal to D_c. eta = 1 without momentum or clip is CFG."""
    average: Tensor | None = None

    def rule(d_cond: Tensor, d_uncond: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal average
        diff = d_cond - d_uncond
        if momentum:
            average = diff if average is None else diff + momentum * average
            diff = average
        if norm_threshold > 0:
            norm = diff.norm(p=2, dim=_dims(diff), keepdim=True)
            diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
        unit = torch.nn.functional.normalize(d_cond.double().flatten(1), dim=1).view_as(d_cond)  # float64 as the paper
        parallel = ((diff.double() * unit).sum(_dims(diff), keepdim=True) * unit).to(diff.dtype)
        return d_cond + (scale - 1) * (diff - parallel + eta * parallel)

    return rule


def cfg_zero_star(scale: float, zero_init_steps: int = 1) -> GuidanceRule:
    """CFG-Zero* (Fan et al. 2025, Eq. 8 and Sec. 3.3) on the rectified-flow velocity v = eps - x0 of the state
    (x = x0 + sigma eps; for a flow model the network's own output): v = s v_u + w (v_c - s v_u) with the per-sample
    projection s = <v_c, v_u> / |v_u|^2, and v = 0 for the first `zero_init_steps` evaluations ("zero init")."""
    calls = 0

    def rule(d_cond: Tensor, d_uncond: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        s = _per_sample(sigma, x).to(x.dtype)
        if calls <= zero_init_steps:
            return x / (1 + s)  # the x0 of v = 0
        v_cond, v_uncond = ((x - (1 + s) * d) / s for d in (d_cond, d_uncond))  # eps - x0, eps = (x - x0) / sigma
        dot = (v_cond * v_uncond).flatten(1).sum(1)
        project = _per_sample(dot / (v_uncond.flatten(1).square().sum(1) + 1e-8), x)
        v = project * v_uncond + scale * (v_cond - project * v_uncond)
        return (x - s * v) / (1 + s)

    return rule


GUIDANCE_METHODS: dict[str, Callable[..., GuidanceRule]] = {"cfg": cfg, "apg": apg, "cfg_zero_star": cfg_zero_star}


def guidance_rule(method: str, scale: float, **options: Any) -> GuidanceRule:
    """The rule registered under `method`, built with its options; a wrong name or option is a ValueError."""
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance method {method!r}; expected one of {sorted(GUIDANCE_METHODS)}")
    check_options(GUIDANCE_METHODS[method], options, f"guidance method {method!r}", skip=("scale",))
    return GUIDANCE_METHODS[method](scale, **options)


def check_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """A guidance interval [sigma_lo, sigma_hi] with 0 <= lo < hi (hi may be inf), as a tuple."""
    if interval is None:
        return None
    if len(interval) != 2 or not 0 <= float(interval[0]) < float(interval[1]):
        raise ValueError(f"guidance_interval must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (sigma_hi may "
                         f"be inf), got {list(interval)}")
    return float(interval[0]), float(interval[1])


# ------------------------------------------------------------------------------------------------ the wrapper
def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4 and Algorithm 2; diffusers' rescale_noise_cfg): match the guided
    prediction's per-sample std to the conditional one's, then mix by `rescale` in [0, 1] (the paper's phi, 0.7)."""
    dims = _dims(guided)
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
    denoiser: ConditionalDenoiser, cond: Any, uncond: Any, scale: float, rescale: float = 0.0, *,
    method: str = "cfg", interval: Sequence[float] | None = None, **options: Any,
) -> Denoiser:
    """Guided denoiser in x0 space, cond and uncond in one batched forward.

    Args:
        cond, uncond: the conditioning of the prompts and of the unconditional / negative prompt, batch B or 1: a
            tensor (B, L, D) or a NamedTuple of tensors (a backbone's `Conditioning`), concatenated field by field.
        scale: guidance weight w; with method "cfg", 1 returns the conditional denoiser exactly (one half-size
            forward) and 0 the unconditional one.
        rescale: Lin et al.'s phi in [0, 1]. It is applied to the guided x0 prediction (this denoiser's currency),
            not to the network's eps / v output as diffusers does; the two differ by the c_skip x term of D.
        method: a key of GUIDANCE_METHODS ("cfg", "apg", "cfg_zero_star"); `options` are its keyword options.
        interval: [sigma_lo, sigma_hi]: guide only where sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al. 2024);
            elsewhere the conditional prediction, from a half-size forward. None guides at every noise level.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale}")
    rule = guidance_rule(method, scale, **options)
    lo, hi = check_interval(interval) or (-math.inf, math.inf)
    plain = method == "cfg" and scale == 1.0

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        batch = x.shape[0]
        inside = (sigma > lo) & (sigma <= hi)  # (B,)
        if plain or not inside.any():
            return denoiser(x, sigma, _batch(cond, batch))
        both = _cat(_batch(cond, batch), _batch(uncond, batch))  # batch 2B
        d_cond, d_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = rule(d_cond, d_uncond, x, sigma)
        if rescale > 0:
            guided = rescale_guidance(guided, d_cond, rescale)
        return guided if inside.all() else torch.where(_per_sample(inside, x), guided, d_cond)

    return denoise
