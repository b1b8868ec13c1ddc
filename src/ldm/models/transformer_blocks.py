"""Pieces shared by the transformer backbones (`ldm.models.dit`, `ldm.models.mmdit`): patch embedding, the 2D sin-cos
positional grid of MAE / DiT (He et al., 2021, arXiv:2111.06377), attention through SDPA, the MLP, RMSNorm and the
adaLN modulation of DiT (Peebles & Xie, 2022, arXiv:2212.09748).

Numerically these follow diffusers' `PatchEmbed`, `get_2d_sincos_pos_embed`, `Attention` and `FeedForward`, so that
converted PixArt / SD3 weights give the same outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -------------------------------------------------------------------------------------------------------
# Patches and positions
# -------------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, height: int, width: int, *, base_size: float, interpolation_scale: float = 1.0,
                        grid_size: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """2D sin-cos positions of a (height, width) patch grid (MAE): (height * width, dim) float32, row-major.

    grid_size None: each axis is laid out over `base_size / interpolation_scale` units whatever its length, so a
    grid larger than the training one interpolates between the trained positions (PixArt-alpha; diffusers'
    `get_2d_sincos_pos_embed`). grid_size M: the centre crop of the M x M grid laid out that way, so every size
    sees the same spacing (SD3's `pos_embed_max_size`). The first half of the channels encodes the column, the
    second half the row, as in MAE's code.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos positional embedding needs a width divisible by 4, got {dim}")
    grid_h, grid_w = (height, width) if grid_size is None else (grid_size, grid_size)
    top, left = (grid_h - height) // 2, (grid_w - width) // 2
    # Same op order and precision as diffusers (float32 grid, float64 frequencies) so the tables agree bit for bit.
    rows = torch.arange(top, top + height, device=device, dtype=torch.float32) / (grid_h / base_size)
    cols = torch.arange(left, left + width, device=device, dtype=torch.float32) / (grid_w / base_size)
    col, row = torch.meshgrid(cols / interpolation_scale, rows / interpolation_scale, indexing="xy")  # (h, w) each
    return torch.cat([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], dim=1).float()  # (height * width, dim)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, device=pos.device, dtype=dtype) / (dim / 2.0)
    out = torch.outer(pos.reshape(-1).to(dtype), 1.0 / 10000**omega)  # (M, dim / 2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


class SinCosPosEmbed(nn.Module):
    """The positional table for a latent of any size (no parameters): a grid of its own, stretched over
    `base_size` patches (PixArt), or with `max_size` the centre crop of one max_size^2 grid (SD3). Eager calls
    keep one table per size and device; under `torch.compile` the table is part of the graph."""

    def __init__(self, dim: int, *, base_size: int, interpolation_scale: float = 1.0,
                 max_size: int | None = None) -> None:
        super().__init__()
        self.dim, self.base_size, self.interpolation_scale, self.max_size = dim, base_size, interpolation_scale, max_size
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def forward(self, height: int, width: int, device: torch.device) -> Tensor:
        """(1, height * width, dim) float32 for a grid of height x width patches."""
        if torch.compiler.is_compiling():
            return self.table(height, width, device)
        key = (height, width, torch.device(device))
        if key not in self._cache:
            self._cache[key] = self.table(height, width, device)
        return self._cache[key]

    def table(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        if self.max_size is not None and (height > self.max_size or width > self.max_size):
            raise ValueError(f"a {height}x{width} patch grid does not fit the positional grid of "
                             f"{self.max_size}x{self.max_size} patches (pos_embed_max_size)")
        return sincos_pos_embed_2d(self.dim, height, width, base_size=self.base_size,
                                   interpolation_scale=self.interpolation_scale, grid_size=self.max_size,
                                   device=device).unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens by a stride-p conv (ViT): (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid


def unpatchify(x: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """(B, height * width, p * p * C) tokens -> (B, C, height * p, width * p), the inverse of `PatchEmbed`'s layout."""
    B, p = x.shape[0], patch_size
    x = x.reshape(B, height, width, p, p, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, height * p, width * p)


# -------------------------------------------------------------------------------------------------------
# Attention, MLP, norms
# -------------------------------------------------------------------------------------------------------


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    B, N, _ = x.shape
    return x.view(B, N, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, _, N, _ = x.shape
    return x.transpose(1, 2).reshape(B, N, -1)


def key_mask(mask: Tensor | None) -> Tensor | None:
    """(B, L) bool, True for real tokens -> (B, 1, 1, L) for SDPA. A row with no real token attends to all of them
    (what diffusers' -10000 bias gives) instead of producing NaNs."""
    if mask is None:
        return None
    mask = mask.bool()
    return (mask | ~mask.any(dim=-1, keepdim=True))[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (Vaswani et al., 2017)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, N, d) each
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))  # (B, N, D)


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens to `context` tokens, which have already the model's width."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), context (B, L, D), mask (B, 1, 1, L) bool from `key_mask` -> (B, N, D)."""
        q = split_heads(self.q(x), self.heads)  # (B, h, N, d)
        k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))  # (B, h, L, d) each
        return self.out(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class Mlp(nn.Module):
    """Linear -> activation -> Linear (ViT's MLP; also PixArt's caption and SD3's pooled-text projections)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None,
                 act: Literal["gelu_tanh", "silu"] = "gelu_tanh") -> None:
        super().__init__()
        if act not in ("gelu_tanh", "silu"):
            raise ValueError(f"act must be 'gelu_tanh' or 'silu', got {act!r}")
        self.act = act
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h, approximate="tanh") if self.act == "gelu_tanh" else F.silu(h))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last axis (Zhang & Sennrich, 2019), statistics in float32; SD3.5's QK-norm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)  # float32
        return x.to(dtype) * self.weight.to(dtype)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without affine parameters (adaLN supplies them) that keeps x's dtype under autocast, like
    `ldm.models.norms.LayerNorm`: the modulation right after it rounds to the compute dtype anyway."""
    if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with shift/scale broadcast over the tokens (DiT, Sec. 3.2)."""
    return x * (1 + scale) + shift


@torch.no_grad()
def init_linear(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear in `module` (DiT's `_basic_init`), and the patch conv
    initialised like a Linear on the flattened patch."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
