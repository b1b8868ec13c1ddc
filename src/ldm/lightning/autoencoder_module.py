"""Stage 1: train the KL autoencoder with reconstruction, KL, perceptual and PatchGAN terms.

Generator and discriminator each have their own optimizer, driven by Lightning's manual optimization.
Both are updated from ONE backward pass: the discriminator is frozen while it scores the generator's
reconstructions and sees only detached reconstructions in its own loss, so each optimizer receives exactly
its own gradients, and DDP sees every parameter used once per step (no `find_unused_parameters`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.lightning.nonfinite import NonFiniteGuard
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.autoencoder.losses import AutoencoderLoss
from ldm.utils.checkpoint import check_architecture
from ldm.utils.images import image_grid, log_image_grid
from ldm.utils.logging import logger_step

OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Temporarily stop gradients into `module`'s parameters (they still flow through it to its inputs)."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AutoencoderModule(L.LightningModule):
    """Wires AutoencoderKL, AutoencoderLoss and an optional discriminator into a training loop."""

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        loss: AutoencoderLoss,
        optimizer: OptimizerFactory,
        discriminator: nn.Module | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        grad_clip: float | None = 1.0,
        max_nonfinite_steps: int = 20,
        num_val_images: int = 8,
    ) -> None:
        super().__init__()
        if discriminator is not None and disc_optimizer is None:
            raise ValueError("A discriminator needs a disc_optimizer (model.disc_optimizer).")
        self.automatic_optimization = False
        self.autoencoder, self.loss, self.discriminator = autoencoder, loss, discriminator
        self.optimizer_factory, self.disc_optimizer_factory = optimizer, disc_optimizer
        self.scheduler_factory, self.grad_clip = lr_scheduler, grad_clip
        self.num_val_images = num_val_images
        self.guard = NonFiniteGuard(max_nonfinite_steps)

    # ------------------------------------------------------------------ optimizers
    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.autoencoder.parameters(), *self.loss.parameters()] if p.requires_grad]

    def configure_model(self) -> None:
        if self._device_mesh is not None:  # set by trainer=fsdp; without this, Lightning's message blames the hook
            raise ValueError("trainer=fsdp shards the stage-2 UNet; an autoencoder fits one GPU: train it with "
                             "trainer=ddp (or gpu).")

    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer_factory(self.generator_parameters())]
        if self.discriminator is not None:
            optimizers.append(self.disc_optimizer_factory(self.discriminator.parameters()))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(optimizers[0]), "interval": "step"}]

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise ValueError("Stage 1 supports precision=32 or bf16-mixed; fp16 needs a grad scaler per optimizer.")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = batch["image"]
        step = self.global_step  # counts batches: the discriminator's optimizer is stepped raw (see _step)
        gan_on = self.discriminator is not None and self.loss.gan_active(step)
        recon, posterior = self.autoencoder(x)
        with frozen(self.discriminator):
            logits_fake = self.discriminator(recon) if gan_on else None
        g_loss, logs = self.loss.generator_loss(x, recon, posterior, logits_fake, step,
                                                self.autoencoder.last_layer if gan_on else None)
        loss = g_loss
        if gan_on:
            d_loss, d_logs = self.loss.discriminator_loss(
                self.discriminator(x.detach()), self.discriminator(recon.detach()), step)
            loss, logs = loss + d_loss, {**logs, **d_logs}
        elif self.discriminator is not None:  # touch every parameter so DDP's reducer sees them all
            loss = loss + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
        self._step(loss, gan_on)
        bs = x.shape[0]
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items() if k != "rec"}, batch_size=bs)
        self.log("train/rec", logs["rec"], batch_size=bs)  # on the bar via callbacks.progress
        return loss.detach()

    def _step(self, loss: Tensor, gan_on: bool) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_g = optimizers[0]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if not self.guard.all_finite(self.trainer.strategy, loss):
            return
        self.manual_backward(loss)
        norms = [self._clip(self.generator_parameters())]
        if gan_on:
            norms.append(self._clip(list(self.discriminator.parameters())))
        if not self.guard.all_finite(self.trainer.strategy, *norms):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return
        self.log("train/grad_norm", norms[0], batch_size=1)
        opt_g.step()  # the LightningOptimizer: advances global_step once per batch
        if gan_on:
            optimizers[1].optimizer.step()  # raw optimizer: must not advance global_step a second time
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/lr", opt_g.param_groups[0]["lr"], batch_size=1)

    def _clip(self, params: list[nn.Parameter]) -> Tensor:
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.autoencoder.encode(x)
        z = posterior.mode()
        recon = self.autoencoder.decode(z)
        x01, r01 = (x.float() + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
        self.log_dict({
            "val/rec_l1": (recon - x).abs().mean(),
            "val/kl": posterior.kl().mean(),
            "val/psnr": peak_signal_noise_ratio(r01, x01, data_range=1.0),
            "val/ssim": structural_similarity_index_measure(r01, x01, data_range=1.0),
        }, sync_dist=True, batch_size=x.shape[0])
        dims = [0, 2, 3]
        for c, (m, s) in enumerate(zip(z.float().mean(dims), z.float().std(dims))):
            self.log_dict({f"val/latent_mean_{c}": m, f"val/latent_std_{c}": s}, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            n = min(self.num_val_images, x.shape[0])
            grid = image_grid(torch.cat([x[:n], recon[:n]]), nrow=n)
            log_image_grid(self.loggers, "val/reconstructions", grid, self.global_step,
                           fallback_dir=f"{self.trainer.default_root_dir}/images", caption="top: input, bottom: recon",
                           log_step=logger_step(self.trainer))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm"] = {"stage": "autoencoder", "autoencoder": self.autoencoder.config,
                             "nonfinite": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("ldm", {})
        if meta.get("stage", "autoencoder") != "autoencoder":
            raise ValueError(f"This is a {meta['stage']!r} checkpoint; stage 1 resumes only autoencoder checkpoints.")
        check_architecture(meta.get("autoencoder"), self.autoencoder.config, "autoencoder")
        if "nonfinite" in meta:
            self.guard.load_state_dict(meta["nonfinite"])
