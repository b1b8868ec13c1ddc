"""Noise-level embeddings shared by the denoisers: the sinusoidal timestep features of DDPM (Ho et al., 2020,
arXiv:2006.11239, after Vaswani et al., 2017) and the two-layer MLP that turns them into the UNet's embedding.

With `flip_sin_to_cos=True, shift=0.0` (the defaults) the features are those of the OpenAI / CompVis UNet and
of diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`, so Stable Diffusion weights apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, *, flip_sin_to_cos: bool = True, shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t (Vaswani et al., 2017, Sec. 3.5): (B,) float or long -> (B, dim) float32.

    Args:
        t: timesteps or any scalar noise conditioning (`c_noise`); fractional values are fine.
        flip_sin_to_cos: order the halves `[cos, sin]` (OpenAI/SD) instead of `[sin, cos]` (DDPM's TF code).
        shift: frequencies are `max_period ** (-i / (dim // 2 - shift))`; 0 for SD, 1 for DDPM.
    """
    half = dim // 2
    # The op order below mirrors diffusers' `get_timestep_embedding` so fp32 results match bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - shift))  # (half,)
    args = t.reshape(-1, 1).float() * freqs  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2 * half)
    return F.pad(emb, (0, dim % 2))  # (B, dim), zero column for odd dim


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear: the UNet's time embedding (DDPM; `time_embed` in SD)."""

    def __init__(self, in_dim: int, embed_dim: int, *, flip_sin_to_cos: bool = True, shift: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.flip_sin_to_cos, self.shift = in_dim, flip_sin_to_cos, shift
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """(B,) timesteps -> (B, embed_dim); `dtype` casts the features first (the UNet passes x's dtype)."""
        emb = timestep_embedding(t, self.in_dim, flip_sin_to_cos=self.flip_sin_to_cos, shift=self.shift)
        emb = emb.to(dtype or emb.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))  # (B, embed_dim)
