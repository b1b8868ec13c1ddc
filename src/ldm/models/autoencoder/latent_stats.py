"""Latent statistics for the stage-1 -> stage-2 hand-off: SD's scalar scale and per-channel mean/std."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class LatentStats:
    """Streaming per-channel moments of latents (B, C, H, W), in float64 so millions of values sum exactly enough.

    `reduce` takes a function that sums a tensor across ranks (e.g. `strategy.reduce(t, reduce_op="sum")`),
    so the statistics are those of every rank's data, not rank 0's.
    """

    def __init__(self, channels: int) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)

    def update(self, z: Tensor) -> None:
        z = z.detach().to(torch.float64).cpu()
        self.count += z.shape[0] * z.shape[2] * z.shape[3]
        self.sum += z.sum(dim=(0, 2, 3))
        self.sumsq += z.square().sum(dim=(0, 2, 3))

    def reduce(self, sum_across_ranks: Callable[[Tensor], Tensor]) -> None:
        packed = sum_across_ranks(torch.cat([self.count[None], self.sum, self.sumsq]))
        c = self.sum.numel()
        self.count, self.sum, self.sumsq = packed[0], packed[1:1 + c], packed[1 + c:]

    def finalize(self) -> tuple[float, Tensor, Tensor]:
        """(scale, mean, std): scale = 1 / std of all latent values (SD's 0.18215 convention), per-channel mean/std."""
        if self.count <= 1:
            raise ValueError("No latents were accumulated: cannot compute latent statistics.")
        n = self.count
        mean = self.sum / n
        std = (self.sumsq / n - mean.square()).clamp_min(0).sqrt()
        global_mean = self.sum.sum() / (n * mean.numel())
        global_var = self.sumsq.sum() / (n * mean.numel()) - global_mean.square()
        scale = float(1.0 / global_var.clamp_min(1e-12).sqrt())
        return scale, mean.float(), std.clamp_min(1e-6).float()
