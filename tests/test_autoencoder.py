"""AutoencoderKL shapes, posterior math, latent statistics, the PatchGAN discriminator and a fit to real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ldm.models.autoencoder.discriminator import NLayerDiscriminator
from ldm.models.autoencoder.kl import PRESETS, AutoencoderKL, DiagonalGaussian
from ldm.models.autoencoder.losses import AutoencoderLoss

# preset -> (downsample factor, latent channels)
GEOMETRY = {"kl_f4_c3": (4, 3), "kl_f8_c4": (8, 4), "kl_f8_c16": (8, 16), "tiny": (4, 4)}


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**PRESETS["tiny"]).eval()


# -------------------------------------------------------------------------------------------------------
# Shapes and geometry
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_preset_shapes(name: str) -> None:
    factor, channels = GEOMETRY[name]
    model = AutoencoderKL(**PRESETS[name]).eval()
    assert model.downsample_factor == factor and model.latent_channels == channels
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (1, channels, 32 // factor, 48 // factor)
        assert model.decode(posterior.mode()).shape == x.shape


def test_kl_f8_c4_matches_sd_parameter_count() -> None:
    # Stable Diffusion's VAE (diffusers AutoencoderKL, sd-vae-ft-mse) has 83,653,863 parameters.
    assert sum(p.numel() for p in AutoencoderKL(**PRESETS["kl_f8_c4"]).parameters()) == 83_653_863


def test_forward_and_config_round_trip(tiny: AutoencoderKL) -> None:
    x = torch.randn(2, 3, 16, 16)
    recon, posterior = tiny(x, sample_posterior=False)
    assert recon.shape == x.shape and isinstance(posterior, DiagonalGaussian)
    rebuilt = AutoencoderKL(**tiny.config)
    rebuilt.load_state_dict(tiny.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, sample_posterior=False)[0], tiny(x, sample_posterior=False)[0])
    assert tiny.config["channel_mult"] == [1, 2, 2]
    assert tiny.last_layer is tiny.decoder.conv_out.weight


def test_options_without_attention_and_quant_conv() -> None:
    model = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8,
                          mid_attention=False, use_quant_conv=False)
    keys = model.state_dict().keys()
    assert not any("attn" in k or "quant_conv" in k for k in keys)
    assert model(torch.randn(1, 3, 8, 8))[0].shape == (1, 3, 8, 8)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderKL(base_channels=24, norm_groups=32)
    with pytest.raises(ValueError, match="latent_norm"):
        AutoencoderKL(**PRESETS["tiny"], latent_norm="minmax")  # type: ignore[arg-type]


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(**dict(PRESETS["tiny"], mid_attention=True))
    x = torch.randn(2, 3, 16, 16)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        recon, posterior = model(x, sample_posterior=False)
        ((recon - x).abs().mean() + posterior.kl().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    assert model.config["gradient_checkpointing"]
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------------------------------------
# Posterior
# -------------------------------------------------------------------------------------------------------


def test_kl_of_standard_normal_is_zero() -> None:
    posterior = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    torch.testing.assert_close(posterior.kl(), torch.zeros(3))


def test_kl_matches_closed_form() -> None:
    torch.manual_seed(0)
    moments = torch.randn(2, 6, 3, 3)
    posterior = DiagonalGaussian(moments)
    expected = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected)
    assert (posterior.kl() > 0).all()
    other = DiagonalGaussian(torch.randn(2, 6, 3, 3))
    expected = kl_divergence(Normal(posterior.mean, posterior.std), Normal(other.mean, other.std)).sum((1, 2, 3))
    torch.testing.assert_close(posterior.kl(other), expected)


def test_posterior_sampling_and_clamp() -> None:
    moments = torch.cat([torch.full((1, 2, 64, 64), 0.5), torch.full((1, 2, 64, 64), 2 * np.log(0.1))], dim=1)
    posterior = DiagonalGaussian(moments)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(posterior.sample(g1), posterior.sample(g2))
    z = posterior.sample()
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.1) < 0.01
    assert posterior.mode() is posterior.mean
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 100.0)], dim=1))
    assert extreme.logvar.item() == 20.0 and torch.isfinite(extreme.kl()).all()


# -------------------------------------------------------------------------------------------------------
# Latent statistics
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_norm", ["scale", "channel"])
def test_normalize_round_trip(latent_norm: str) -> None:
    model = AutoencoderKL(**dict(PRESETS["tiny"], latent_norm=latent_norm))
    assert not model.latent_stats_set
    model.set_latent_stats(scale=0.5, mean=[0.1, -0.2, 0.3, 0.0], std=[1.0, 2.0, 0.5, 4.0])
    assert model.latent_stats_set
    z = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z)
    mean, std = model.latent_mean[:, None, None], model.latent_std[:, None, None]
    expected = z * 0.5 if latent_norm == "scale" else (z - mean) / std * 0.5
    torch.testing.assert_close(model.normalize(z), expected)


@pytest.mark.parametrize("latent_norm", ["scale", "channel"])
def test_fit_latent_stats_gives_unit_variance(latent_norm: str) -> None:
    model = AutoencoderKL(**dict(PRESETS["tiny"], latent_norm=latent_norm))
    z = torch.randn(64, 4, 8, 8) * torch.tensor([1.0, 3.0, 5.0, 7.0])[:, None, None] + 2.0
    model.fit_latent_stats(z)
    normalized = model.normalize(z)
    if latent_norm == "channel":
        torch.testing.assert_close(normalized.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(normalized.std((0, 2, 3)), torch.ones(4))
    else:
        assert abs(normalized.std().item() - 1.0) < 1e-5


def test_latent_stats_travel_in_state_dict() -> None:
    model = AutoencoderKL(**PRESETS["tiny"])
    model.set_latent_stats(scale=0.18215)
    fresh = AutoencoderKL(**PRESETS["tiny"])
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.latent_stats_set and fresh.latent_scale.item() == pytest.approx(0.18215)


def test_set_latent_stats_validates() -> None:
    model = AutoencoderKL(**PRESETS["tiny"])
    with pytest.raises(ValueError, match="shape"):
        model.set_latent_stats(mean=[0.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        model.set_latent_stats(std=[1.0, 0.0, 1.0, 1.0])


# -------------------------------------------------------------------------------------------------------
# Discriminator
# -------------------------------------------------------------------------------------------------------


def test_discriminator_patch_shape_and_init() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70 px receptive field, pix2pix geometry
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and abs(convs[2].weight.std().item() - 0.02) < 0.002
    assert convs[1].bias is None and convs[-1].bias is not None


def test_discriminator_group_norm_is_batch_independent() -> None:
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=16, n_layers=2).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(disc(x)[:1], disc(x[:1]))  # BatchNorm would fail this
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="instance")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------
# Training sanity on real photos
# -------------------------------------------------------------------------------------------------------


def photos(size: int = 32) -> torch.Tensor:
    """astronaut, coffee, chelsea from scikit-image (shipped offline), in [-1, 1], (3, 3, size, size)."""
    from skimage import data

    images = [data.astronaut(), data.coffee(), data.chelsea()]
    tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 127.5 - 1 for im in images]
    return torch.cat([F.interpolate(t, size=(size, size), mode="area") for t in tensors])




def test_tiny_autoencoder_fits_photos(one_thread) -> None:
    torch.manual_seed(0)
    x = photos()
    model = AutoencoderKL(**PRESETS["tiny"])
    loss_fn = AutoencoderLoss(kl_weight=1e-6, disc_start=10**9)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    history = []
    for step in range(100):
        recon, posterior = model(x)
        loss, logs = loss_fn.generator_loss(x, recon, posterior, None, step, model.last_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(logs["rec"].item())
    start, end = history[0], float(np.mean(history[-5:]))
    assert end < 0.5 * start, f"L1 went from {start:.3f} to {end:.3f}"
