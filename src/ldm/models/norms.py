"""Normalisation layers that keep the input's dtype under autocast, shared by the autoencoder and the UNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm that keeps the input's dtype under autocast.

    Autocast runs `group_norm` in fp32, which turns each bf16 activation into an fp32 copy that the SiLU after
    it and the tensors saved for backward inherit. The kernel already accumulates its statistics in fp32, so
    staying in bf16 halves the memory traffic of every norm layer at no cost in accuracy that the next conv
    (which rounds to bf16 anyway) would keep.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that keeps the input's dtype under autocast (see `GroupNorm`); the next op is a Linear."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
