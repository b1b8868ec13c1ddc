"""Autoencoder training objective of latent diffusion (Rombach et al., 2022, arXiv:2112.10752, app. G):
reconstruction + LPIPS under a learned variance, a small KL term, and a PatchGAN term whose weight adapts to
the gradient norms at the decoder's last layer (Esser et al., 2021, arXiv:2012.09841, eq. 7).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.autoencoder.kl import DiagonalGaussian

PixelLoss = Literal["l1", "l2"]
GanLoss = Literal["hinge", "non_saturating"]


class AutoencoderLoss(nn.Module):
    """LDM's `LPIPSWithDiscriminator`, without optimizer code: the training module calls the two methods.

    As in LDM, the reconstruction NLL and the KL are summed over pixels / latent elements and averaged over the
    batch, so `kl_weight` (1e-6 in SD) and `disc_weight` (0.5) keep their published meaning.

    Args:
        perceptual: image distance (B,) such as `LPIPS`, added per pixel to the reconstruction error.
        logvar_init: initial value of the learned scalar log-variance of the NLL,
            nll = rec / exp(logvar) + logvar. Give `loss.logvar` to the generator's optimizer.
        disc_loss: "hinge" (discriminator hinge, generator -D(x_fake)) or "non_saturating" (logistic loss,
            generator softplus(-D(x_fake)) = -log sigmoid(D(x_fake))).
        disc_start: first step with GAN terms; before it they are zero and not computed.
        disc_factor: extra multiplier of both GAN terms once they are on.
    """

    def __init__(
        self,
        pixel_loss: PixelLoss = "l1",
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        disc_loss: GanLoss = "hinge",
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_start: int = 50001,
        max_adaptive_weight: float = 1e4,
    ) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        if disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {disc_loss!r}")
        self.pixel_loss, self.disc_loss = pixel_loss, disc_loss
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.disc_weight, self.disc_factor, self.disc_start = disc_weight, disc_factor, disc_start
        self.max_adaptive_weight = max_adaptive_weight

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are on at `step`; the training module can skip the discriminator before."""
        return step >= self.disc_start and self.disc_factor > 0

    # --- generator (autoencoder) step -----------------------------------------------------------------

    def generator_loss(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian, logits_fake: Tensor | None,
                       step: int, last_layer: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total autoencoder loss and detached logs. `logits_fake` = D(recon) with gradients to recon.

        `last_layer` (`AutoencoderKL.last_layer`) enables the adaptive GAN weight; without it, or with autograd
        disabled (validation), the GAN term is weighted by `disc_weight` alone.
        """
        rec = (x - recon).abs() if self.pixel_loss == "l1" else (x - recon).square()  # (B, C, H, W)
        logs = {"rec": rec.mean().detach()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(x, recon)  # (B,)
            rec = rec + self.perceptual_weight * p.view(-1, *([1] * (rec.ndim - 1)))
            logs["perceptual"] = p.mean().detach()
        # sum_i (rec_i / exp(logvar) + logvar) / B, written without a second full-size temporary.
        nll = (rec.sum() / torch.exp(self.logvar) + self.logvar * rec.numel()) / x.shape[0]
        kl = posterior.kl().mean()
        loss = nll + self.kl_weight * kl
        logs.update(nll=nll.detach(), kl=kl.detach(), logvar=self.logvar.detach())
        if logits_fake is not None and self.gan_active(step):
            g = self._generator_gan(logits_fake)
            d_weight = self.adaptive_weight(nll, g, last_layer)
            loss = loss + d_weight * self.disc_factor * g
            logs.update(g=g.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def adaptive_weight(self, nll: Tensor, g: Tensor, last_layer: Tensor | None) -> Tensor:
        """disc_weight * ||grad nll|| / (||grad g|| + 1e-4) at the last layer (Esser et al., 2021, eq. 7).

        Clamped to [0, max_adaptive_weight] and detached; 0 when g has no gradient there. Uses
        `retain_graph=True`, so the caller's backward through the same graph still works.
        """
        if last_layer is None or not torch.is_grad_enabled() or not (nll.requires_grad and g.requires_grad):
            return torch.tensor(self.disc_weight, device=g.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)[0]
        g_grad = torch.autograd.grad(g, last_layer, retain_graph=True, allow_unused=True)[0]
        zero = torch.zeros((), device=g.device)
        nll_norm = zero if nll_grad is None else nll_grad.detach().norm()
        g_norm = zero if g_grad is None else g_grad.detach().norm()
        # Without the guard a zero GAN gradient would give the clamp maximum rather than "no GAN signal".
        weight = torch.where(g_norm > 0, nll_norm / (g_norm + 1e-4), zero)
        return weight.clamp(0.0, self.max_adaptive_weight) * self.disc_weight

    def _generator_gan(self, logits_fake: Tensor) -> Tensor:
        if self.disc_loss == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    # --- discriminator step ---------------------------------------------------------------------------

    def discriminator_loss(self, logits_real: Tensor, logits_fake: Tensor,
                           step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on D(x) and D(recon.detach()); exactly zero before `disc_start`."""
        if self.disc_loss == "hinge":
            d = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        else:
            d = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        factor = self.disc_factor if self.gan_active(step) else 0.0
        logs = {"d": d.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
        return factor * d, logs
