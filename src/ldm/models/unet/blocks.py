"""Building blocks of the latent-diffusion UNet (Rombach et al., 2022, arXiv:2112.10752): timestep-conditioned
residual blocks, resamplers, and the spatial transformer that cross-attends to text tokens.

Layer for layer the CompVis / diffusers blocks, so Stable Diffusion weights load via `ldm.models.unet.convert`;
attention always goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.norms import GroupNorm, LayerNorm


def heads_for(channels: int, num_heads: int | None, head_channels: int | None) -> int:
    """Number of attention heads: fixed `num_heads`, or `channels // head_channels` (SD2 uses 64 channels)."""
    if (num_heads is None) == (head_channels is None):
        raise ValueError(f"give exactly one of num_heads / head_channels, got {num_heads=} {head_channels=}")
    heads = num_heads if num_heads is not None else channels // head_channels
    if heads < 1 or channels % heads or (head_channels is not None and channels % head_channels):
        raise ValueError(f"{channels} channels do not split into heads ({num_heads=}, {head_channels=})")
    return heads


# -------------------------------------------------------------------------------------------------------
# Convolutional blocks
# -------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Pre-activation residual block with the time embedding added between its convs (Ho et al., 2020)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C_in, H, W), emb (B, E) already through SiLU -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 conv 3x3 with symmetric padding (SD's UNet; the VAE pads asymmetrically instead)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a conv 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


# -------------------------------------------------------------------------------------------------------
# Transformer
# -------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (no bias, as in SD)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        # unbind(2) keeps q, k, v as strided views of one buffer whose gradients stack back without a permute.
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # (B, N, h, d) each
        h = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv))  # (B, h, N, d)
        return self.out(h.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to `context` tokens; k and v share one projection."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, C = x.shape
        d = C // self.heads
        q = self.q(x).view(B, N, self.heads, d).transpose(1, 2)  # (B, h, N, d)
        k, v = (t.transpose(1, 2) for t in self.kv(context).view(B, -1, 2, self.heads, d).unbind(2))  # (B, h, L, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.out(h.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class GEGLUFeedForward(nn.Module):
    """Linear -> GEGLU -> Linear with 4x inner width (Shazeer, 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, 4C) each
        return self.out(h * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, N, C), context (B, L, D) -> (B, N, C)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, `depth` transformer blocks over the H*W tokens, proj_out, residual (LDM Sec. 3.3).

    `use_linear_projection` picks Linear (SD2) or 1x1-conv (SD1) projections; they are the same map, but the
    weights are stored differently.
    """

    def __init__(self, channels: int, context_dim: int, *, num_heads: int | None = None,
                 head_channels: int | None = 64, depth: int = 1, use_linear_projection: bool = True,
                 norm_groups: int = 32) -> None:
        super().__init__()
        heads = heads_for(channels, num_heads, head_channels)
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else lambda i, o: nn.Conv2d(i, o, 1)
        self.proj_in = proj(channels, channels)
        self.blocks = nn.ModuleList(BasicTransformerBlock(channels, context_dim, heads) for _ in range(depth))
        self.proj_out = proj(channels, channels)
        self.linear = use_linear_projection

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, C, H, W), context (B, L, D) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        # Token layout; a view (no copy) when x is channels_last.
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides: no copy
        if not self.linear:
            h = self.proj_out(h)
        return x + h
