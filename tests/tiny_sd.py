"""Tiny random Stable Diffusion 2.x-like parts for the interop tests: a diffusers UNet and VAE (every parameter
random, norms included) and the tiny OpenCLIP text tower, in our classes too; released formats are written from them."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from ldm.models.autoencoder.convert import (
    autoencoder_kwargs_from_diffusers_config,
    convert_diffusers_autoencoder,
)
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.convert import convert_diffusers_unet, unet_kwargs_from_diffusers_config
from ldm.models.unet.unet import UNet

TEXT_MODEL = "ldm-tiny-text"  # width 64: the UNet's context
# SD 2.x's UNet shape at toy size: attention at every level, linear projections, 16-channel heads, 32 norm groups.
UNET_CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                   cross_attention_dim=64, use_linear_projection=True, norm_num_groups=32,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
# f4, 4 latent channels, SD's 0.18215 scaling factor (diffusers' default).
VAE_CONFIG = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  sample_size=32)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights and biases too), so that no wrong mapping can hide behind an init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    return model.eval()


def diffusers_unet(**changes) -> UNet2DConditionModel:
    return randomize(UNet2DConditionModel(**{**UNET_CONFIG, **changes}), 0)


def diffusers_vae(**changes) -> DiffusersAutoencoderKL:
    return randomize(DiffusersAutoencoderKL(**{**VAE_CONFIG, **changes}), 1)


def text_encoder() -> OpenCLIPTextEncoder:
    encoder = OpenCLIPTextEncoder(TEXT_MODEL, pretrained=None)
    randomize(encoder.text, 2)
    return encoder


def ours_unet(theirs: UNet2DConditionModel) -> UNet:
    model = UNet(**unet_kwargs_from_diffusers_config(theirs.config))
    model.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True)
    return model.eval()


def ours_autoencoder(theirs: DiffusersAutoencoderKL) -> AutoencoderKL:
    model = AutoencoderKL(**autoencoder_kwargs_from_diffusers_config(theirs.config))
    model.load_state_dict(convert_diffusers_autoencoder(theirs.state_dict(), theirs.config), strict=True)
    return model.eval()
