"""Lightning's rich progress bar, with an epoch count that makes sense when training is bounded by steps, and
metrics read from the device only every `log_every_n_steps`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """`RichProgressBar` that shows "Epoch 3" rather than "Epoch 3/-2" when the number of epochs is unbounded
    (`max_epochs=-1`, as in every step-bounded ldm run and in the resampled data mode).

    Its metrics are fetched only every `log_every_n_steps` training steps: fetching turns device tensors into
    Python numbers, a host synchronisation. Lightning converts every `prog_bar=True` metric after every batch, so
    the modules log with `prog_bar=False` and this bar shows the logged metrics named in `show` (as their last
    path component: `train/loss` -> `loss`) at its own pace. The bar itself still moves on every step."""

    def __init__(self, *args: Any, show: tuple[str, ...] = ("train/loss", "train/rec"), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.show = tuple(show)
        self._metrics: dict[str, Any] | None = None
        self._metrics_step = -1

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # padded: no flicker beside "Validation"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        step, every = trainer.global_step, max(1, trainer.log_every_n_steps)
        if self._metrics is None or not trainer.training or step // every != self._metrics_step // every:
            metrics = super().get_metrics(trainer, pl_module)
            for key in self.show:
                value = trainer.callback_metrics.get(key)
                if value is not None:
                    metrics[key.rsplit("/", 1)[-1]] = float(value)
            self._metrics, self._metrics_step = metrics, step
        return self._metrics
