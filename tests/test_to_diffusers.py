"""Ours -> diffusers converters (UNet, autoencoder): a random ldm model, converted, loads strictly into the diffusers
class built from the exported config, gives the same outputs, and converts back to identical tensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from ldm.models.autoencoder.convert import (
    autoencoder_kwargs_from_diffusers_config,
    autoencoder_to_diffusers,
    convert_diffusers_autoencoder,
    latent_norm_for_sd_pipeline,
)
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.unet.convert import (
    convert_diffusers_unet,
    unet_kwargs_from_diffusers_config,
    unet_to_diffusers,
)
from ldm.models.unet.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

UNETS = {
    # conf/model/backbone/unet_tiny.yaml: head width 16, linear projections, attention at both levels
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=None,
                 head_channels=16, context_dim=24, norm_groups=8),
    # SD1 style: fixed head count, 1x1-conv projections, a level without attention, depth 2
    "sd1_like": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                     num_heads=4, head_channels=None, transformer_depth=2, context_dim=24,
                     use_linear_projection=False, norm_groups=8, in_channels=3, out_channels=5),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialised output convs too), so no tensor is checked only at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.3))
    return model.eval()


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_to_diffusers_same_outputs_and_round_trip(name: str) -> None:
    ours = randomize(UNet(**UNETS[name]))
    config, state = unet_to_diffusers(ours, sample_size=8)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, ours.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, 24, generator=g)
    t = torch.tensor([3.7, 812.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, context), theirs(x, t, context).sample, atol=1e-5, rtol=1e-5)
    back = UNet(**unet_kwargs_from_diffusers_config(config))
    back.load_state_dict(convert_diffusers_unet(state), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_unet_to_diffusers_refuses_another_backbone() -> None:
    with pytest.raises(ValueError, match="takes an ldm UNet, got Linear"):
        unet_to_diffusers(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


AUTOENCODERS = {
    "tiny_scale": (dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, mid_attention=False,
                        norm_groups=8), dict(scale=0.18215)),
    "attention_channel": (dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=2, norm_groups=8,
                               latent_norm="channel"), dict(scale=1.3, mean=[0.1, -0.2, 0.3, 0.0],
                                                            std=[0.5, 2.0, 1.0, 1.5])),
    "shift_noquant": (dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                           latent_norm="channel", use_quant_conv=False, latent_channels=3),
                      dict(scale=1.0, mean=[0.25] * 3, std=[0.5] * 3)),
}


@pytest.mark.parametrize("name", list(AUTOENCODERS))
def test_autoencoder_to_diffusers_same_outputs_and_round_trip(name: str) -> None:
    kwargs, stats = AUTOENCODERS[name]
    ours = randomize(AutoencoderKL(**kwargs))
    ours.set_latent_stats(**stats)
    config, state = autoencoder_to_diffusers(ours)
    theirs = DiffusersAutoencoderKL(**config).eval()
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.encode(x).latent_dist
        torch.testing.assert_close(ours.encode(x).mean, expected.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode(x).logvar, expected.logvar, atol=1e-5, rtol=1e-5)
        z = expected.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
    back = AutoencoderKL(**autoencoder_kwargs_from_diffusers_config(config))
    back.load_state_dict(convert_diffusers_autoencoder(state, config), strict=True)
    for key, value in ours.state_dict().items():
        if not key.startswith("latent_"):
            assert torch.equal(back.state_dict()[key], value), key
    # the statistics may be written differently (shift_factor) but normalize the same way
    torch.testing.assert_close(back.normalize(z), ours.normalize(z), atol=1e-6, rtol=1e-6)


def test_latent_config_follows_diffusers_conventions() -> None:
    ae = AutoencoderKL(**AUTOENCODERS["tiny_scale"][0])
    ae.set_latent_stats(scale=0.18215)
    config, _ = autoencoder_to_diffusers(ae)
    assert config["scaling_factor"] == pytest.approx(0.18215) and config["shift_factor"] is None
    assert latent_norm_for_sd_pipeline(config) is None
    ae = AutoencoderKL(**AUTOENCODERS["shift_noquant"][0])
    ae.set_latent_stats(scale=1.5, mean=[0.25] * 3, std=[0.5] * 3)
    config, _ = autoencoder_to_diffusers(ae)
    # SD3's (z - shift) * scaling: shift = mean, scaling = scale / std
    assert config["shift_factor"] == pytest.approx(0.25) and config["scaling_factor"] == pytest.approx(3.0)
    assert "shift_factor" in latent_norm_for_sd_pipeline(config)
