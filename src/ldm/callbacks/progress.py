"""Lightning's rich progress bar, with an epoch count that makes sense when training is bounded by steps."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """`RichProgressBar` that shows "Epoch 3" rather than "Epoch 3/-2" when the number of epochs is unbounded
    (`max_epochs=-1`, as in every step-bounded ldm run and in the resampled data mode)."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"  # padded: no flicker beside "Validation"
