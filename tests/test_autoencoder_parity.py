"""Parity with diffusers' AutoencoderKL: random diffusers weights, converted, must give the same numbers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from ldm.models.autoencoder.convert import (
    autoencoder_kwargs_from_diffusers_config,
    convert_compvis_autoencoder,
    convert_diffusers_autoencoder,
    load_diffusers_autoencoder,
)
from ldm.models.autoencoder.kl import AutoencoderKL

SD_LIKE = [
    dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8),
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
    dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16,
         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5, shift_factor=0.1),
    dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False),
]


def diffusers_model(**config) -> DiffusersAutoencoderKL:
    torch.manual_seed(0)
    n = len(config["block_out_channels"])
    config = dict(dict(latent_channels=4), **config)
    model = DiffusersAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n, **config).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every norm non-trivial too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def assert_same_outputs(theirs: DiffusersAutoencoderKL, ours: AutoencoderKL) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, expected.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(posterior.logvar, expected.logvar, atol=1e-5, rtol=1e-5)
        z = torch.randn_like(expected.mean)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", SD_LIKE, ids=["groups8", "groups32", "c16_noquant", "no_attention"])
def test_diffusers_weights_give_same_outputs(config: dict) -> None:
    theirs = diffusers_model(**config)
    kwargs = autoencoder_kwargs_from_diffusers_config(theirs.config)
    ours = AutoencoderKL(**kwargs).eval()
    ours.load_state_dict(convert_diffusers_autoencoder(theirs.state_dict(), theirs.config), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert_same_outputs(theirs, ours)
    # The latent statistics follow the config.
    assert ours.latent_stats_set
    assert ours.latent_scale.item() == pytest.approx(theirs.config.scaling_factor)
    if theirs.config.shift_factor is not None:
        assert kwargs["latent_norm"] == "channel"
        z = torch.randn(1, kwargs["latent_channels"], 2, 2)
        expected = (z - theirs.config.shift_factor) * theirs.config.scaling_factor
        torch.testing.assert_close(ours.normalize(z), expected)


def test_load_from_diffusers_folder(tmp_path) -> None:
    theirs = diffusers_model(**SD_LIKE[0])
    save_file(theirs.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(theirs.config)))
    ours = load_diffusers_autoencoder(tmp_path).eval()
    assert_same_outputs(theirs, ours)


def to_compvis(state_dict: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers keys -> the original CompVis layout (attention as 1x1 convs), the format of SD `.ckpt` files."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", key)
        key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", key)
        key = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}", key)
        key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{levels - 1 - int(m[1])}.upsample", key)
        key = key.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        key = key.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
        key = re.sub(r"to_([qkv])\.", r"\1.", key).replace("to_out.0", "proj_out")
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts of an SD checkpoint
    out["first_stage_model.loss.logvar"] = torch.zeros(())
    return out


def test_compvis_checkpoint_gives_same_outputs() -> None:
    theirs = diffusers_model(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8)
    compvis = to_compvis(theirs.state_dict(), levels=3)
    # Guard on the test's own key mapping: diffusers' CompVis importer must rebuild exactly their weights.
    rebuilt = convert_ldm_vae_checkpoint(compvis, dict(theirs.config))
    assert rebuilt.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(rebuilt[key], value)
    ours = AutoencoderKL(**autoencoder_kwargs_from_diffusers_config(theirs.config)).eval()
    ours.load_state_dict(convert_compvis_autoencoder(compvis), strict=True)
    assert_same_outputs(theirs, ours)


def test_unsupported_config_is_rejected() -> None:
    config = dict(block_out_channels=(32, 48), down_block_types=("DownEncoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="multiples"):
        autoencoder_kwargs_from_diffusers_config(config)
    with pytest.raises(ValueError, match="act_fn"):
        autoencoder_kwargs_from_diffusers_config(dict(config, act_fn="gelu"))
