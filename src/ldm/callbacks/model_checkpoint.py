"""Lightning's ModelCheckpoint, plus a final `last.ckpt` when training ends between two periodic saves.

With `every_n_train_steps=N`, Lightning writes `last.ckpt` only every N steps, so a run that stops at max_steps
(or on `should_stop`) between saves loses its last steps: the sampler and `ckpt_path=last` would see stale weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint

from ldm.utils.checkpoint import LAST


class ModelCheckpoint(_ModelCheckpoint):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None or trainer.global_step == 0:
            return
        if self._last_global_step_saved != trainer.global_step:  # every rank calls this: the save is collective
            trainer.save_checkpoint(str(Path(self.dirpath) / LAST))
            self._last_global_step_saved = trainer.global_step
