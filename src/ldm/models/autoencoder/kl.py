"""KL-regularised convolutional autoencoder of latent diffusion (Rombach et al., 2022, arXiv:2112.10752).

Layer for layer the CompVis / diffusers `AutoencoderKL`, so Stable Diffusion weights load through
`ldm.models.autoencoder.convert`; the model also owns the statistics that map its latents to unit scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.norms import GroupNorm

LatentNorm = Literal["scale", "channel"]

# Constructor kwargs of the usual geometries, the same as conf/model/autoencoder/*.yaml.
PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x/2.x VAE (LDM kl-f8): 256 px -> 32x32x4, 83.7 M parameters.
    "kl_f8_c4": dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4),
    # LDM kl-f4: 256 px -> 64x64x3.
    "kl_f4_c3": dict(base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3),
    # 16-channel f8 latent (the SD3/Flux channel count); consider latent_norm="channel" for it.
    "kl_f8_c16": dict(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=16),
    # Smoke tests and CPU sanity runs: 32 px -> 8x8x4, ~0.9 M parameters.
    "tiny": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                 mid_attention=False, norm_groups=8),
}


# -------------------------------------------------------------------------------------------------------
# Posterior
# -------------------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) from the encoder's moments (Kingma & Welling, 2014)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        # The clamp keeps exp() finite early in training; the bounds are those of the original LDM.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample, summed over latent dims; `other=None` means N(0, I). Returns (B,)."""
        # In fp32 even under autocast: a bf16 sum over all latent elements would lose the small KL.
        mean, logvar = self.mean.float(), self.logvar.float()
        dims = tuple(range(1, mean.ndim))
        if other is None:
            return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dims)
        mean2, logvar2 = other.mean.float(), other.logvar.float()
        return 0.5 * ((mean - mean2).square() * torch.exp(-logvar2) + torch.exp(logvar - logvar2)
                      - 1.0 - logvar + logvar2).sum(dims)


# -------------------------------------------------------------------------------------------------------
# Layers
# -------------------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv 3x3) twice, 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a residual connection (the VAE's mid block)."""

    def __init__(self, channels: int, *, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)  # one matmul instead of three
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        return x + self.proj(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 conv 3x3 after a right/bottom zero pad, the asymmetric padding of the original LDM weights."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a conv 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, optional attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, *, attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn = Attention(channels, norm_groups=norm_groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, then a resampler (or nothing)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        # Named `downsample`/`upsample` like the CompVis checkpoints, so their keys map one to one.
        self.resample_name = resample_name
        self.add_module(resample_name, resample if resample is not None else nn.Identity())

    def forward(self, x: Tensor, grad_checkpoint: bool = False) -> Tensor:
        for block in self.blocks:
            x = _call(block, x, grad_checkpoint)
        return getattr(self, self.resample_name)(x)


def _call(module: nn.Module, x: Tensor, grad_checkpoint: bool) -> Tensor:
    # Recompute the block in backward instead of storing its activations (Chen et al., 2016).
    if grad_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


# -------------------------------------------------------------------------------------------------------
# Encoder / decoder
# -------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """x (B, C_in, H, W) -> moments (B, 2c, H/f, W/f) with f = 2**(len(channel_mult) - 1)."""

    def __init__(self, *, in_channels: int, out_channels: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, mid_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(ch, width, dropout=dropout, norm_groups=norm_groups))
                ch = width
            resample = Downsample(ch) if i < len(widths) - 1 else None
            self.down.append(Level(blocks, resample, "downsample"))
        self.mid = MidBlock(ch, attention=mid_attention, dropout=dropout, norm_groups=norm_groups)
        self.norm_out = GroupNorm(norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, self.gradient_checkpointing)
        h = _call(self.mid, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, c, h, w) -> x (B, C_out, h*f, w*f); levels run from the lowest resolution up, as in diffusers."""

    def __init__(self, *, latent_channels: int, out_channels: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, mid_attention: bool, dropout: float, norm_groups: int) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, attention=mid_attention, dropout=dropout, norm_groups=norm_groups)
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, widths[i], dropout=dropout, norm_groups=norm_groups))
                ch = widths[i]
            resample = Upsample(ch) if i > 0 else None
            self.up.append(Level(blocks, resample, "upsample"))
        self.norm_out = GroupNorm(norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = _call(self.mid, h, self.gradient_checkpointing)
        for level in self.up:
            h = level(h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


# -------------------------------------------------------------------------------------------------------
# Autoencoder
# -------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL autoencoder (Rombach et al., 2022) that also owns its latent normalisation.

    `normalize(z)` maps latents to the scale the diffusion model is trained on, `denormalize` inverts it:

    - `latent_norm="scale"` (Stable Diffusion 1/2/XL): `z * latent_scale`, e.g. 0.18215 for SD's VAE.
    - `latent_norm="channel"`: `(z - latent_mean) / latent_std * latent_scale`, per channel. With the default
      scale of 1 this is plain standardisation; the scalar also expresses SD3/Flux's `(z - shift) * scale`
      (mean = shift, std = 1) and Playground v2.5's `(z - mean) * scale / std`.

    Args:
        channel_mult: width of each resolution level as a multiple of `base_channels`; the spatial
            downsampling factor is 2**(len(channel_mult) - 1).
        norm_groups: GroupNorm groups; every level's width must be divisible by it (32 in all SD VAEs).
        use_quant_conv: the 1x1 `quant_conv`/`post_quant_conv` around the latent (SD 1/2/XL have them).
        gradient_checkpointing: recompute each residual block in backward to save activation memory.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        latent_channels: int = 4,
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_quant_conv: bool = True,
        latent_norm: LatentNorm = "scale",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        _check_geometry(base_channels, channel_mult, norm_groups, latent_norm)
        self._config = dict(
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks, latent_channels=latent_channels,
            mid_attention=mid_attention, dropout=dropout, norm_groups=norm_groups, use_quant_conv=use_quant_conv,
            latent_norm=latent_norm, gradient_checkpointing=gradient_checkpointing,
        )
        shared = dict(base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                      mid_attention=mid_attention, dropout=dropout, norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=in_channels, out_channels=2 * latent_channels, **shared)
        self.decoder = Decoder(latent_channels=latent_channels, out_channels=out_channels, **shared)
        quant = use_quant_conv
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if quant else nn.Identity()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if quant else nn.Identity()
        self.latent_norm = latent_norm
        self.set_gradient_checkpointing(gradient_checkpointing)

        # Persistent buffers: the statistics travel with the weights in every checkpoint.
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        self.register_buffer("latent_stats_set", torch.tensor(False))

    # --- geometry -----------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (plain Python values), for checkpoints and model cards."""
        return dict(self._config, channel_mult=list(self._config["channel_mult"]))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self._config["channel_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self._config["latent_channels"]

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's final conv, for the adaptive GAN weight (Esser et al., 2021, eq. 7)."""
        return self.decoder.conv_out.weight

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
        self._config["gradient_checkpointing"] = enabled

    # --- encode / decode ----------------------------------------------------------------------------

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x (B, C_in, H, W) in [-1, 1] -> posterior over z (B, c, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Raw (un-normalised) latent z (B, c, h, w) -> x (B, C_out, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # --- latent statistics --------------------------------------------------------------------------

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latent -> diffusion-space latent (see the class docstring for the two conventions)."""
        if self.latent_norm == "scale":
            return z * self.latent_scale
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None] * self.latent_scale

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of `normalize`."""
        if self.latent_norm == "scale":
            return z / self.latent_scale
        return z / self.latent_scale * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    @torch.no_grad()
    def set_latent_stats(self, scale: float | Tensor | None = None, mean: Sequence[float] | Tensor | None = None,
                         std: Sequence[float] | Tensor | None = None) -> None:
        """Set any of the statistics (the others keep their values) and mark them as set."""
        c = self.latent_channels
        for name, value, shape in (("latent_scale", scale, ()), ("latent_mean", mean, (c,)), ("latent_std", std, (c,))):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape} (latent_channels={c}), got {tuple(value.shape)}")
            if name != "latent_mean" and not bool((value > 0).all()):
                raise ValueError(f"{name} must be positive, got {value}")
            getattr(self, name).copy_(value)
        self.latent_stats_set.fill_(True)

    @torch.no_grad()
    def fit_latent_stats(self, z: Tensor) -> None:
        """Estimate the statistics from raw latents (B, c, h, w), e.g. posterior samples of a data batch.

        "scale" sets `latent_scale = 1 / std(z)` as SD did; "channel" sets per-channel mean and std and leaves
        the scale at 1. Under DDP, gather z from all ranks first so that every rank sets the same values.
        """
        z = z.float()
        if self.latent_norm == "scale":
            self.set_latent_stats(scale=1.0 / z.std())
        else:
            self.set_latent_stats(scale=1.0, mean=z.mean(dim=(0, 2, 3)), std=z.std(dim=(0, 2, 3)))


def _check_geometry(base_channels: int, channel_mult: tuple[int, ...], norm_groups: int, latent_norm: str) -> None:
    if latent_norm not in ("scale", "channel"):
        raise ValueError(f"latent_norm must be 'scale' or 'channel', got {latent_norm!r}")
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
    bad = [base_channels * m for m in channel_mult if (base_channels * m) % norm_groups]
    if base_channels % norm_groups or bad:
        raise ValueError(f"every level width (base_channels * mult) must be divisible by norm_groups={norm_groups}; "
                         f"base_channels={base_channels}, channel_mult={channel_mult}")
