"""The denoiser-backbone contract: what the diffusion module, EMA, the sampling callbacks, pipeline loading and the
FSDP code may rely on in a network, and the conditioning it reads. A UNet, a DiT or an MMDiT each implement it; a
new backbone is one file plus one config (`conf/model/backbone/<name>.yaml`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class Conditioning(NamedTuple):
    """What a text encoder gives a backbone. A NamedTuple of tensors: classifier-free guidance concatenates two of
    them field by field (`ldm.diffusion.guidance`), without knowing the fields.

    tokens: (B, L, D) per-token states, the cross-attention (UNet, DiT) or joint-attention (MMDiT) context.
    pooled: (B, P) one vector per prompt (SD3's pooled CLIP embedding, added to the timestep modulation).
    mask: (B, L) bool, True where a token is real; None when every token counts (CLIP's fixed 77 with padding
        states, as SD trains).
    """

    tokens: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    def expand(self, batch_size: int) -> Conditioning:
        """A batch-1 conditioning repeated (as a view) to `batch_size`; any other batch is returned as it is."""
        return Conditioning(*(_expand(t, batch_size) for t in self))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Every field on `device`; the floating-point ones (not the mask) also in `dtype`."""
        return Conditioning(*(None if t is None else t.to(device, dtype if t.is_floating_point() else None)
                              for t in self))

    def where(self, keep: Tensor, other: Conditioning) -> Conditioning:
        """Per sample: this conditioning where `keep` (B,) is True, else `other` (batch 1 or B); caption dropout."""
        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None:
                return None
            b = b.to(dtype=a.dtype, device=a.device).expand_as(a)
            return torch.where(keep.view(-1, *(1,) * (a.ndim - 1)), a, b)

        return Conditioning(*(pick(a, b) for a, b in zip(self, other)))


def _expand(t: Tensor | None, batch_size: int) -> Tensor | None:
    if t is None or t.shape[0] != 1 or batch_size == 1:
        return t
    return t.expand(batch_size, *t.shape[1:])


@runtime_checkable
class Backbone(Protocol):
    """A denoiser network F(c_in x, c_noise, cond) -> raw output; what the output means (eps, v, velocity, EDM's F)
    is the process's parameterization's business, not the backbone's.

    in_channels, out_channels: latent channels read and written.
    context_dim: width of `Conditioning.tokens` it reads; pooled_dim: width of `Conditioning.pooled` (None: unused).
    size_multiple: latent H and W must be multiples of this (UNet: 2 ** downsamplings; DiT: the patch size).
    config: constructor arguments; `type(b)(**b.config)` builds the same architecture.
    blocks(): the repeated units (FSDP2 shards each, gradient checkpointing and regional compile wrap each).
    lora_targets (optional, for `ldm.models.lora`): {"attention": suffixes, "mlp": suffixes} of the nn.Linear names
        that take LoRA adapters.
    """

    in_channels: int
    out_channels: int
    context_dim: int
    pooled_dim: int | None
    size_multiple: int

    @property
    def config(self) -> dict[str, Any]: ...

    def blocks(self) -> list[nn.Module]: ...

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor: ...


def check_backbone(module: nn.Module) -> Backbone:
    """`module` if it declares the backbone contract, else a TypeError naming what is missing."""
    missing = [name for name in ("in_channels", "out_channels", "context_dim", "pooled_dim", "size_multiple",
                                 "config", "blocks") if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{type(module).__name__} is not a denoiser backbone: it lacks {', '.join(missing)} "
                        "(see ldm.models.backbone.Backbone).")
    return module  # type: ignore[return-value]
