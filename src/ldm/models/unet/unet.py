"""The Stable Diffusion UNet: a timestep-conditioned convolutional UNet with spatial transformers that cross-attend
to text tokens (Rombach et al., 2022, arXiv:2112.10752; ADM backbone of Dhariwal & Nichol, 2021).

`UNet(x, c_noise, cond)` returns the raw network output; what it means (eps, v, F of EDM) is decided by the
parameterization that wraps it. Diffusers / SD 2.x weights load through `ldm.models.unet.convert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.backbone import Conditioning
from ldm.models.embeddings import TimestepEmbedding
from ldm.models.unet.blocks import Downsample, GroupNorm, ResBlock, SpatialTransformer, Upsample


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks, a transformer after each (if attending), a resampler."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample if resample is not None else nn.Identity()


class MidBlock(nn.Module):
    """ResBlock, transformer, ResBlock at the lowest resolution (diffusers' `UNetMidBlock2DCrossAttn`)."""

    def __init__(self, res_1: ResBlock, attn: SpatialTransformer, res_2: ResBlock) -> None:
        super().__init__()
        self.res_1, self.attn, self.res_2 = res_1, attn, res_2


class UNet(nn.Module):
    """x (B, C_in, H, W), c_noise (B,) or (), cond (tokens (B, L, context_dim)) -> (B, C_out, H, W); implements
    `ldm.models.backbone.Backbone`.

    Args:
        channel_mult: width of each level as a multiple of `model_channels`; H and W must be divisible by
            2 ** (len(channel_mult) - 1).
        attention_levels: indices of the levels that get a `SpatialTransformer` after each ResBlock (the mid
            block always has one). SD: (0, 1, 2).
        num_heads / head_channels: give one; a fixed head count (SD1: 8) or a fixed head width (SD2: 64).
        gradient_checkpointing: recompute every ResBlock / transformer in backward instead of storing its
            activations (Chen et al., 2016); outputs and gradients are unchanged.

    Init: the last conv of every ResBlock, every `proj_out` and `conv_out` start at zero (ADM / SD convention),
    so each residual branch starts as the identity and the untrained net outputs 0; the rest is PyTorch's default.
    """

    # LoRA targets (ldm.models.lora): module-name suffixes in every BasicTransformerBlock
    lora_targets = {"attention": ("attn1.qkv", "attn1.out", "attn2.q", "attn2.kv", "attn2.out"),
                    "mlp": ("ff.proj", "ff.out")}

    def __init__(self, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (0, 1, 2), num_heads: int | None = None,
                 head_channels: int | None = 64, transformer_depth: int = 1, context_dim: int = 1024,
                 use_linear_projection: bool = True, dropout: float = 0.0, norm_groups: int = 32,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        channel_mult, attention_levels = tuple(channel_mult), tuple(attention_levels)
        if any(not 0 <= i < len(channel_mult) for i in attention_levels):
            raise ValueError(f"attention_levels must index channel_mult (0..{len(channel_mult) - 1}), "
                             f"got {attention_levels}")
        self._config = dict(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            num_heads=num_heads, head_channels=head_channels, transformer_depth=transformer_depth,
            context_dim=context_dim, use_linear_projection=use_linear_projection, dropout=dropout,
            norm_groups=norm_groups, gradient_checkpointing=gradient_checkpointing,
        )
        self.gradient_checkpointing = gradient_checkpointing
        self.downsampling = 2 ** (len(channel_mult) - 1)
        # the backbone contract (ldm.models.backbone.Backbone)
        self.in_channels, self.out_channels, self.context_dim = in_channels, out_channels, context_dim
        self.pooled_dim: int | None = None  # token states only, as SD
        self.size_multiple = self.downsampling
        emb_dim = 4 * model_channels

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout=dropout, norm_groups=norm_groups)

        def attn(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, context_dim, num_heads=num_heads, head_channels=head_channels,
                                      depth=transformer_depth, use_linear_projection=use_linear_projection,
                                      norm_groups=norm_groups)

        self.time_embed = TimestepEmbedding(model_channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        ch, skips = model_channels, [model_channels]  # widths of the tensors the up path concatenates
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(res(ch, model_channels * mult))
                ch = model_channels * mult
                skips.append(ch)
            last = level == len(channel_mult) - 1
            transformers = [attn(ch) for _ in blocks] if level in attention_levels else []
            self.down.append(Level(blocks, transformers, None if last else Downsample(ch)))
            skips += [] if last else [ch]

        self.mid = MidBlock(res(ch, ch), attn(ch), res(ch, ch))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(ch + skips.pop(), model_channels * mult))
                ch = model_channels * mult
            transformers = [attn(ch) for _ in blocks] if level in attention_levels else []
            self.up.append(Level(blocks, transformers, Upsample(ch) if level > 0 else None))

        self.norm_out = GroupNorm(norm_groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: `UNet(**unet.config)` builds the same architecture."""
        return dict(self._config, gradient_checkpointing=self.gradient_checkpointing)

    def blocks(self) -> list[nn.Module]:
        """The ResBlocks and transformers: FSDP2 units, gradient-checkpointing units."""
        return [m for m in self.modules() if isinstance(m, (ResBlock, SpatialTransformer))]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Zero the output of every residual branch and of the network (ADM / SD); PyTorch defaults elsewhere."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, block: nn.Module, h: Tensor, cond: Tensor) -> Tensor:
        # Recompute the block in backward instead of storing its activations (Chen et al., 2016).
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, cond, use_reentrant=False)
        return block(h, cond)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning | Tensor) -> Tensor:
        """`cond`: a Conditioning (its token states are the cross-attention context) or the token states alone."""
        context = cond.tokens if isinstance(cond, Conditioning) else cond  # (B, L, context_dim)
        B, _, H, W = x.shape
        if H % self.downsampling or W % self.downsampling:
            raise ValueError(f"H and W must be divisible by {self.downsampling}, got {tuple(x.shape)}")
        # The blocks only ever use SiLU(emb), so apply it once here instead of in every ResBlock.
        emb = F.silu(self.time_embed(c_noise.reshape(-1).expand(B), dtype=x.dtype))  # (B, 4 * model_channels)

        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = self._run(block, h, emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h, context)
                skips.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)  # (B, C, H/2, W/2)
                skips.append(h)

        h = self._run(self.mid.res_1, h, emb)
        h = self._run(self.mid.attn, h, context)
        h = self._run(self.mid.res_2, h, emb)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h, context)
            h = level.resample(h)  # (B, C, 2H, 2W), or identity at the top level
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
