"""Lightning's ModelCheckpoint, plus a final `last.ckpt` when training ends between two periodic saves.

With `every_n_train_steps=N`, Lightning writes `last.ckpt` only every N steps, so a run that stops at max_steps
(or on `should_stop`) between saves loses its last steps: the sampler and `ckpt_path=last` would see stale weights.

The save at max_steps (or on a stop an earlier callback requested) happens at the end of the last batch, like a
periodic save, not at the end of training: by then Lightning has counted the unfinished epoch as completed, so a
run continued from that checkpoint (a larger max_steps, `ckpt_path=last`) would start a new epoch's data instead of
finishing the current one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint

from ldm.utils.checkpoint import LAST


class ModelCheckpoint(_ModelCheckpoint):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The last step: max_steps reached, or a stop requested by an earlier callback (Timer's max_time, early
        # stopping). Checkpoint callbacks run after all others, and Lightning stops after this hook.
        if trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved == trainer.global_step:
            return  # saved at the last batch; Lightning's own end-of-training save would overwrite it
        super().on_train_end(trainer, pl_module)
        self._save_final(trainer)  # other stops (max_epochs)

    def _save_final(self, trainer: L.Trainer) -> None:
        if not self.save_last or self.dirpath is None or trainer.global_step == 0:
            return
        if self._last_global_step_saved != trainer.global_step:  # every rank calls this: the save is collective
            trainer.save_checkpoint(str(Path(self.dirpath) / LAST), weights_only=False)  # the full state
            self._last_global_step_saved = trainer.global_step
