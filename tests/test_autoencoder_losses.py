"""AutoencoderLoss against hand computations: NLL with learned variance, KL, GAN losses, adaptive weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.autoencoder.discriminator import NLayerDiscriminator
from ldm.models.autoencoder.kl import AutoencoderKL, DiagonalGaussian
from ldm.models.autoencoder.losses import AutoencoderLoss


class MeanAbs(nn.Module):
    """Stand-in perceptual distance (B,) with a known value."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x - y).abs().mean((1, 2, 3))


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = AutoencoderKL(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, posterior = model(x)
    return model, disc, x, recon, posterior


def test_nll_kl_and_perceptual_match_manual() -> None:
    _, _, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss(pixel_loss="l2", perceptual=MeanAbs(), perceptual_weight=0.7, kl_weight=1e-3,
                              logvar_init=0.3)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, None, step=0, last_layer=None)
    rec = (x - recon).square() + 0.7 * (x - recon).abs().mean((1, 2, 3))[:, None, None, None]
    nll = (rec / math.exp(0.3) + 0.3).sum() / 2
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).sum((1, 2, 3)).mean()
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["kl"], kl.detach())
    torch.testing.assert_close(loss, nll + 1e-3 * kl)
    torch.testing.assert_close(logs["rec"], (x - recon).square().mean().detach())
    assert set(logs) == {"rec", "perceptual", "nll", "kl", "logvar", "loss"}


def test_gradients_reach_logvar() -> None:
    _, _, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss()
    loss, _ = loss_fn.generator_loss(x, recon, posterior, None, step=0, last_layer=None)
    loss.backward()
    # d/dlogvar [sum(rec) e^-logvar + N logvar] / B at logvar = 0
    expected = (-(x - recon).abs().sum() + x.numel()) / 2
    torch.testing.assert_close(loss_fn.logvar.grad, expected.detach())
    assert not AutoencoderLoss(learn_logvar=False).logvar.requires_grad


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_gan_losses_on_known_logits(kind: str) -> None:
    loss_fn = AutoencoderLoss(disc_loss=kind, disc_start=0, disc_factor=2.0)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    d, logs = loss_fn.discriminator_loss(real, fake, step=5)
    if kind == "hinge":  # mean(relu(1 - real)) = (0 + 0.5 + 2) / 3, mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3
        expected_d, expected_g = 0.5 * (2.5 / 3 + 3.5 / 3), -fake.mean()
    else:
        expected_d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
        expected_g = -F.logsigmoid(fake).mean()
    torch.testing.assert_close(d, 2.0 * torch.as_tensor(expected_d))
    torch.testing.assert_close(logs["d"], torch.as_tensor(expected_d))
    torch.testing.assert_close(logs["logits_real"], real.mean())
    torch.testing.assert_close(loss_fn._generator_gan(fake), torch.as_tensor(expected_g))


def test_adaptive_weight_matches_manual_and_keeps_graph() -> None:
    model, disc, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss(disc_start=0, disc_weight=0.5, kl_weight=1e-6)
    logits_fake = disc(recon)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, logits_fake, step=0, last_layer=model.last_layer)

    nll = ((x - recon).abs().sum() + 0.0) / 2  # logvar = 0
    g = -logits_fake.mean()
    nll_grad = torch.autograd.grad(nll, model.last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, model.last_layer, retain_graph=True)[0]
    weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    torch.testing.assert_close(logs["d_weight"], weight)
    assert not logs["d_weight"].requires_grad
    torch.testing.assert_close(loss, nll + 1e-6 * posterior.kl().mean() + weight * g)
    loss.backward()  # the graph survived the two autograd.grad calls
    assert model.last_layer.grad is not None and torch.isfinite(model.last_layer.grad).all()
    # the weight is a constant: loss gradient = grad(nll) + weight * grad(g) (+ the tiny KL, zero at last layer)
    torch.testing.assert_close(model.last_layer.grad, nll_grad + weight * g_grad, atol=1e-5, rtol=1e-4)


def test_adaptive_weight_is_zero_when_gan_gradient_is_zero() -> None:
    model, _, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss(disc_start=0)
    logits_fake = 0.0 * recon.mean((1, 2, 3))  # depends on the last layer, zero gradient
    _, logs = loss_fn.generator_loss(x, recon, posterior, logits_fake, step=0, last_layer=model.last_layer)
    assert logs["d_weight"].item() == 0.0
    detached = torch.zeros(2, requires_grad=True)  # no path to the last layer at all
    _, logs = loss_fn.generator_loss(x, recon, posterior, detached, step=0, last_layer=model.last_layer)
    assert logs["d_weight"].item() == 0.0


def test_fixed_weight_without_last_layer_or_grad() -> None:
    model, disc, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss(disc_start=0, disc_weight=0.25)
    _, logs = loss_fn.generator_loss(x, recon, posterior, disc(recon), step=0, last_layer=None)
    assert logs["d_weight"].item() == 0.25
    with torch.no_grad():
        recon, posterior = model(x)
        _, logs = loss_fn.generator_loss(x, recon, posterior, disc(recon), step=0, last_layer=model.last_layer)
    assert logs["d_weight"].item() == 0.25


def test_gan_off_before_disc_start() -> None:
    model, disc, x, recon, posterior = setup()
    loss_fn = AutoencoderLoss(disc_start=100)
    with_gan, logs = loss_fn.generator_loss(x, recon, posterior, disc(recon), step=99, last_layer=model.last_layer)
    without, _ = loss_fn.generator_loss(x, recon, posterior, None, step=99, last_layer=model.last_layer)
    assert torch.equal(with_gan, without) and "g" not in logs and not loss_fn.gan_active(99)
    d, _ = loss_fn.discriminator_loss(disc(x), disc(recon.detach()), step=99)
    assert d.item() == 0.0
    d.backward()
    assert all(p.grad is None or not p.grad.any() for p in disc.parameters())
    assert loss_fn.gan_active(100)
    on, logs = loss_fn.generator_loss(x, recon, posterior, disc(recon), step=100, last_layer=model.last_layer)
    assert "g" in logs and not torch.equal(on, without)


def test_invalid_choices_raise() -> None:
    with pytest.raises(ValueError, match="pixel_loss"):
        AutoencoderLoss(pixel_loss="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disc_loss"):
        AutoencoderLoss(disc_loss="wgan")  # type: ignore[arg-type]


def test_kl_term_uses_posterior() -> None:
    posterior = DiagonalGaussian(torch.cat([torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)], dim=1))
    x = torch.zeros(1, 3, 4, 4)
    _, logs = AutoencoderLoss().generator_loss(x, x, posterior, None, step=0, last_layer=None)
    assert logs["kl"].item() == pytest.approx(0.5 * 8)  # mean^2 / 2 per element
