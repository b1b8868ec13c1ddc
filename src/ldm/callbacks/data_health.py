"""Log how many samples the data pipeline skipped, by cause, summed over workers and ranks."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as L
import torch

from ldm.data.webdataset import SKIP_CAUSES
from ldm.utils.logging import get_logger, logger_step

log = get_logger(__name__)


class DataHealth(L.Callback):
    """Reads `batch["skips"]` (per-worker counts since that worker's previous batch) and logs running totals.

    Ranks see different skips, so totals are summed with one fixed-size all-reduce every `every_n_steps`
    (all ranks reach the same steps); per-key `sync_dist` logging would hang when only one rank saw a cause.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        self.every_n_steps = every_n_steps
        self.local: Counter[str] = Counter()  # this rank's totals since the run started (as of the last fold)
        self.pending: dict[str, torch.Tensor] = {}  # counts that arrived as (device) tensors since then

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for cause, count in ((batch.get("skips") if isinstance(batch, dict) else None) or {}).items():
            if isinstance(count, torch.Tensor):  # summed where it is: int() here would sync with the GPU every step
                total = count.detach().sum()
                self.pending[cause] = self.pending[cause] + total if cause in self.pending else total
            else:
                self.local[cause] += int(count)

    def _fold(self) -> None:
        """Add the pending tensor counts to the host totals: one read-back, at a report or a save."""
        if self.pending:
            causes = list(self.pending)
            values = torch.stack([self.pending[c].to(torch.float64).cpu() for c in causes]).tolist()
            self.local.update({c: int(v) for c, v in zip(causes, values)})
            self.pending = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self._log(trainer, pl_module)
        if trainer.is_global_zero and any(totals.values()):
            log.warning("Samples skipped so far (all ranks): "
                        + ", ".join(f"{k}={v}" for k, v in totals.items() if v))

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
        self._fold()
        causes = list(SKIP_CAUSES)  # the same length on every rank, whatever each one saw
        local = torch.tensor([float(self.local[c]) for c in causes], device=pl_module.device)
        summed = trainer.strategy.reduce(local, reduce_op="sum")
        totals = {c: int(v) for c, v in zip(causes, summed.tolist())}
        for logger in trainer.loggers if trainer.is_global_zero else []:
            logger.log_metrics({f"data/skipped_{c}": v for c, v in totals.items()}, step=logger_step(trainer))
        return totals

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {"local": dict(self.local)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.local = Counter(state_dict.get("local", {}))
