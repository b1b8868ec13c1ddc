"""Parity with diffusers' UNet2DConditionModel: random diffusers weights, converted, must give the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.models.unet.convert import (
    convert_diffusers_unet,
    load_diffusers_unet,
    unet_kwargs_from_diffusers_config,
)
from ldm.models.unet.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# stabilityai/stable-diffusion-2 unet/config.json (the entries that differ from diffusers' defaults).
SD2_CONFIG = dict(attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                  cross_attention_dim=1024, down_block_types=list(SD_DOWN), up_block_types=list(SD_UP),
                  use_linear_projection=True, sample_size=96, norm_eps=1e-05, flip_sin_to_cos=True, freq_shift=0)
# runwayml/stable-diffusion-v1-5: 8 heads everywhere, 1x1-conv projections, CLIP ViT-L context.
SD1_CONFIG = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                  down_block_types=list(SD_DOWN), up_block_types=list(SD_UP), sample_size=64)

TINY_SD = [
    # int attention_head_dim = 8 heads at every width (SD1 semantics), linear projections, 2 ResBlocks per level.
    dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=8, use_linear_projection=True,
         norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # list attention_head_dim = heads per level giving 8-channel heads (SD2 semantics), conv projections.
    dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(4, 8), use_linear_projection=False,
         norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # three levels, attention at two of them, two transformer blocks each, SD2 head semantics.
    dict(block_out_channels=(32, 32, 64), layers_per_block=1, attention_head_dim=(2, 2, 4), use_linear_projection=True,
         transformer_layers_per_block=2, norm_num_groups=8,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
]
IDS = ["heads8_linear", "head_channels8_conv", "three_levels_depth2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_unet(**config) -> UNet2DConditionModel:
    """A diffusers UNet with every parameter random, norms and biases included (nothing stays at its init)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(cross_attention_dim=32, sample_size=16, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    return model


def convert(theirs: UNet2DConditionModel) -> UNet:
    ours = UNet(**unet_kwargs_from_diffusers_config(theirs.config)).eval()
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True)
    return ours


@pytest.mark.parametrize("config", TINY_SD, ids=IDS)
@pytest.mark.parametrize("timesteps", ["float", "long"])
def test_diffusers_weights_give_same_outputs(config: dict, timesteps: str) -> None:
    theirs = diffusers_unet(**config)
    ours = convert(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([3.7, 812.25]) if timesteps == "float" else torch.tensor([3, 999])
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        out = ours(x, t, context)
    assert expected.abs().max() > 0.1  # random weights: a non-trivial function
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match() -> None:
    theirs = diffusers_unet(**TINY_SD[0])
    ours = convert(theirs)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 7, 32)
    t = torch.tensor([10.0, 500.0])
    grads = []
    for model, out in ((theirs, lambda m, *a: m(*a).sample), (ours, lambda m, *a: m(*a))):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        grads.append(torch.autograd.grad(out(model, xi, t, ci).square().mean(), (xi, ci)))
    for ours_g, theirs_g in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours_g, theirs_g, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------------
# Configs of the real checkpoints
# -------------------------------------------------------------------------------------------------------


def test_sd2_config_gives_the_sd2_preset_and_parameter_count() -> None:
    kwargs = unet_kwargs_from_diffusers_config(SD2_CONFIG)
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "unet_sd2.yaml"))
    preset.pop("_target_")
    preset.pop("gradient_checkpointing")
    assert kwargs == {k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()}
    assert kwargs["head_channels"] == 64 and kwargs["num_heads"] is None  # [5, 10, 20, 20] heads on 320..1280
    with torch.device("meta"):
        ours, theirs = UNet(**kwargs), UNet2DConditionModel(**SD2_CONFIG)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 865_910_724
        ours.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True, assign=True)


def test_sd1_config_gives_the_sd15_preset_and_parameter_count() -> None:
    kwargs = unet_kwargs_from_diffusers_config(SD1_CONFIG)
    assert kwargs["num_heads"] == 8 and kwargs["head_channels"] is None
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "unet_sd15.yaml"))
    preset.pop("_target_")
    preset.pop("gradient_checkpointing")
    assert kwargs == {k: tuple(v) if isinstance(v, list) else v for k, v in preset.items()}
    with torch.device("meta"):
        ours, theirs = UNet(**kwargs), UNet2DConditionModel(**SD1_CONFIG)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 859_520_964
        ours.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True, assign=True)
    assert kwargs["context_dim"] == 768 and kwargs["use_linear_projection"] is False


@pytest.mark.parametrize("change,match", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(only_cross_attention=[True, False, False, False]), "only_cross_attention"),
    (dict(up_block_types=list(reversed(SD_DOWN))), "mirror"),
    (dict(attention_head_dim=[5, 8, 20, 20]), "head"),
    (dict(flip_sin_to_cos=False), "flip_sin_to_cos"),
    (dict(transformer_layers_per_block=[1, 2, 2, 2]), "transformer_layers_per_block"),
])
def test_unsupported_configs_are_rejected(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unet_kwargs_from_diffusers_config({**SD2_CONFIG, **change})


def test_load_from_diffusers_folder(tmp_path) -> None:
    theirs = diffusers_unet(**TINY_SD[1])
    save_file(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(theirs.config)))
    ours = load_diffusers_unet(tmp_path).eval()
    x, context, t = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32), torch.tensor([42])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), theirs(x, t, context).sample, rtol=1e-5, atol=1e-5)
