"""A per-rank log of the sample keys of every training step (`keys_rank<r>.tsv` in the run folder): what data order
a run saw, for checking exact resumes, rank disjointness or a suspicious loss spike. Off by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L


class SampleKeyLog(L.Callback):
    """Appends `global_step<TAB>key,key,...` before each training step; flushed per line so a killed run keeps it."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        path = Path(self.dirpath or trainer.default_root_dir) / f"keys_rank{trainer.global_rank}.tsv"
        with path.open("a") as f:
            f.write(f"{trainer.global_step}\t{','.join(batch['key'])}\n")
