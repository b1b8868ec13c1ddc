"""Rank-zero logging: one logger for the whole package, silent on every rank but the first."""

from __future__ import annotations

import logging
import os
from typing import Any

# The function object Lightning itself uses and whose `.rank` its Trainer sets; imported from lightning_utilities
# so that commands without a Trainer (sample.py) need not import Lightning. Until a Trainer sets the rank, take it
# from the launcher's environment, as `lightning.fabric.utilities.rank_zero` does on import.
from lightning_utilities.core.rank_zero import rank_zero_only

_RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
if getattr(rank_zero_only, "rank", None) is None:
    rank_zero_only.rank = next((int(os.environ[k]) for k in _RANK_VARS if k in os.environ), 0)


def get_logger(name: str) -> logging.Logger:
    """A logger whose info/warning calls print only on global rank 0 (as in lightning-hydra-template)."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        setattr(logger, level, rank_zero_only(getattr(logger, level)))
    return logger


def logger_step(trainer: Any) -> int:
    """The step at which Lightning logs `self.log` metrics now: the x axis of every logger (W&B's
    `trainer/global_step`). Metrics that callbacks send to the loggers directly use it too, so the axis never goes
    backwards; `trainer.global_step`, which counts optimizer steps, is one ahead of it in `on_train_batch_end`."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
