"""Preemption: on SIGTERM (SLURM's notice before a kill, or any `kill`) or SIGUSR1 (`#SBATCH --signal=USR1@90`)
the run finishes its current step, writes `last.ckpt` and exits; under SLURM it can requeue itself, and the requeued
job resumes with `ckpt_path=last` (scripts/slurm/train.sbatch)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm.utils.checkpoint import CHECKPOINT_DIR, LAST
from ldm.utils.hydra_ddp import slurm_job_id
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class Preemption(L.Callback):
    """Save `last.ckpt` at the first step boundary after a signal; stop; optionally `scontrol requeue` the job.

    Args:
        signals: names of the signals handled here; SIGTERM is also noticed through Lightning's own handler.
        requeue: under SLURM (SLURM_JOB_ID set), requeue the job from rank 0 after the checkpoint is written.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True) -> None:
        self.signals, self.requeue = tuple(signals), requeue
        self.received: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.signals:
            sig = getattr(signal, name)
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                self.received = signal.Signals(signum).name
                if callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
                    previous(signum, frame)  # Lightning's SIGTERM notice (it stops after this step)

            signal.signal(sig, handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        local = self.received is not None or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(local, all=False):  # any rank signalled: all save
            return
        path = self.last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        for c in trainer.callbacks:  # so the end-of-training save does not write the same step again
            if isinstance(c, ModelCheckpoint):
                c._last_global_step_saved = trainer.global_step
        log.warning(f"Received {self.received or 'SIGTERM'}: saved {path} at step {trainer.global_step}; stopping. "
                    "Resume with ckpt_path=last.")
        trainer.should_stop = True
        self.received = None
        if self.requeue and "SLURM_JOB_ID" in os.environ and trainer.is_global_zero:
            job = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.warning(f"scontrol requeue {job}: {'ok' if result.returncode == 0 else result.stderr.strip()}")

    @staticmethod
    def last_path(trainer: L.Trainer) -> str:
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        directory = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir) / CHECKPOINT_DIR
        return str(directory / LAST)
