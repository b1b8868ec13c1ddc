"""The training module's parts as a LatentDiffusionPipeline, for callbacks that sample during training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import lightning.pytorch as L

from ldm.callbacks.ema import EMA
from ldm.inference.pipeline import LatentDiffusionPipeline


@contextmanager
def training_pipeline(trainer: L.Trainer, pl_module: L.LightningModule, use_ema: bool = True,
                      resolution: int | None = None) -> Iterator[LatentDiffusionPipeline]:
    """A pipeline over the module's own UNet, text encoder and autoencoder; inside the block the UNet is in eval
    mode and, with `use_ema` and an EMA callback in the run, holds the EMA weights. Both are restored after."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA) and c.attribute == "unet"), None)
    resolution = resolution or getattr(getattr(trainer, "datamodule", None), "resolution", None)
    was_training = pl_module.unet.training
    pl_module.unet.eval()
    try:
        with ema.averaged(pl_module) if ema is not None and use_ema else nullcontext():
            yield LatentDiffusionPipeline(pl_module.unet, pl_module.text_encoder, pl_module.autoencoder,
                                          pl_module.loss.schedule, pl_module.loss.parameterization, resolution)
    finally:
        pl_module.unet.train(was_training)
