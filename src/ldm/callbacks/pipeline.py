"""The training module's parts as a LatentDiffusionPipeline, and the base of the callbacks that sample with it
during training."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import lightning.pytorch as L

from ldm.callbacks.ema import EMA
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.inference.sampling_options import SamplingOptions


@contextmanager
def training_pipeline(trainer: L.Trainer, pl_module: L.LightningModule, use_ema: bool = True,
                      resolution: int | None = None) -> Iterator[LatentDiffusionPipeline]:
    """A pipeline over the module's own backbone, text encoder and autoencoder; inside the block the backbone is in eval
    mode and, with `use_ema` and an EMA callback in the run, holds the EMA weights. Both are restored after."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA) and c.attribute == "backbone"), None)
    resolution = resolution or getattr(getattr(trainer, "datamodule", None), "resolution", None)
    was_training = pl_module.backbone.training
    pl_module.backbone.eval()
    try:
        with ema.averaged(pl_module) if ema is not None and use_ema else nullcontext():
            yield LatentDiffusionPipeline(pl_module.backbone, pl_module.text_encoder, pl_module.autoencoder,
                                          pl_module.process, resolution)
    finally:
        pl_module.backbone.train(was_training)


class SamplingCallback(L.Callback):
    """Base of the callbacks that sample during training (`SampleImages`, `EvaluateCallback`): `run` is called when
    the global step is a multiple of `every_n_steps` (0: never during training) and once at the end of training
    unless that step was just done. `sampling` holds the conf/sampling/ keys (checked at start-up);
    `options` are the keyword arguments they give `pipeline.generate`."""

    def __init__(self, every_n_steps: int, *, sampling: SamplingOptions | Mapping[str, Any] | None, use_ema: bool,
                 resolution: int | None) -> None:
        self.every_n_steps, self.use_ema, self.resolution = every_n_steps, use_ema, resolution
        self.sampling = sampling if isinstance(sampling, SamplingOptions) else SamplingOptions.from_config(sampling)
        self.options = self.sampling.generate_kwargs()
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        raise NotImplementedError

    def pipeline(self, trainer: L.Trainer, pl_module: L.LightningModule
                 ) -> AbstractContextManager[LatentDiffusionPipeline]:
        return training_pipeline(trainer, pl_module, self.use_ema, self.resolution)

    def _run_at(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._run_at(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._run_at(trainer, pl_module)
