"""PatchGAN discriminator of pix2pix (Isola et al., 2017, arXiv:1611.07004) as used by taming/LDM.

Normalisation defaults to GroupNorm instead of the original BatchNorm. BatchNorm computes its statistics over
each GPU's own batch, and the generator and discriminator steps feed it all-real or all-fake batches, so its
running statistics and outputs depend on batch composition and differ between DDP ranks unless converted to
SyncBatchNorm (an all-reduce per layer). GroupNorm is per sample: identical under any batch size, any number of
ranks, and in train and eval mode.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

DiscNorm = Literal["group", "batch", "none"]


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv 4x4 stride 2 stack ending in one logit per ~70 px patch (for n_layers=3).

    Args:
        n_layers: stride-2 convolutions after the first; the receptive field grows with it (3 -> 70 px).
        ndf: width of the first layer; layer k has ndf * min(2**k, 8) channels.
        norm: "group" (default, DDP-safe), "batch" (the original; use SyncBatchNorm under DDP) or "none".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: DiscNorm = "group",
                 norm_groups: int = 32) -> None:
        super().__init__()
        if norm not in ("group", "batch", "none"):
            raise ValueError(f"norm must be 'group', 'batch' or 'none', got {norm!r}")
        bias = norm == "none"  # a bias before an affine norm is redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = ndf
        for k in range(1, n_layers + 1):
            out = ndf * min(2**k, 8)
            stride = 2 if k < n_layers else 1  # the last hidden layer keeps the resolution, as in pix2pix
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=bias), _norm(norm, out, norm_groups),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> patch logits (B, 1, H', W')."""
        return self.main(x)


def _norm(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al., 2016): conv ~ N(0, 0.02), norm scale ~ N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
