"""At the end of stage 1: measure latent statistics on every rank, store them, and export the autoencoder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from ldm.models.autoencoder.export import export_autoencoder
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.autoencoder.latent_stats import LatentStats
from ldm.utils.logging import get_logger

log = get_logger(__name__)


@torch.no_grad()
def measure_latents(autoencoder: AutoencoderKL, batches: Iterable[dict[str, Any]], num_batches: int,
                    device: torch.device, sample_posterior: bool = True) -> LatentStats:
    """Accumulate this process's latent moments over up to `num_batches` batches."""
    stats = LatentStats(autoencoder.latent_channels)
    was_training = autoencoder.training
    autoencoder.eval()
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        posterior = autoencoder.encode(batch["image"].to(device))
        stats.update(posterior.sample() if sample_posterior else posterior.mode())
    autoencoder.train(was_training)
    return stats


class LatentStatsExport(L.Callback):
    """On train end: latent scale and per-channel mean/std over `num_batches` per rank, summed over ranks.

    They are set into the autoencoder's buffers, `last.ckpt` is re-saved with them, and rank 0 exports
    `export/autoencoder.{safetensors,json}` for stage 2.
    """

    def __init__(self, num_batches: int = 100, split: str = "train", sample_posterior: bool = True,
                 export_dir: str | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.num_batches, self.split, self.sample_posterior = num_batches, split, sample_posterior
        self.export_dir = export_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        loader = dm.train_dataloader() if self.split == "train" else dm.val_dataloader()
        ae = pl_module.autoencoder
        stats = measure_latents(ae, loader, self.num_batches, pl_module.device, self.sample_posterior)
        stats.reduce(lambda t: trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum").cpu())
        scale, mean, std = stats.finalize()
        ae.set_latent_stats(scale, mean, std)
        log.info(f"Latent statistics over {int(stats.count)} positions: scale={scale:.5f}, "
                 f"mean={[round(v, 4) for v in mean.tolist()]}, std={[round(v, 4) for v in std.tolist()]}")
        out = Path(trainer.default_root_dir)
        trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)
        if trainer.is_global_zero:
            target = export_autoencoder(ae, self.export_dir or out / "export", global_step=trainer.global_step,
                                        resolution=getattr(dm, "resolution", None))
            log.info(f"Exported the autoencoder for stage 2 to {target}")
