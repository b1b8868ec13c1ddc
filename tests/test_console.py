"""What a run prints: the progress bar's epoch count and no Lightning advertisement."""

from __future__ import annotations

import logging

import lightning.pytorch as L
import pytest
from conftest import Lin

import ldm.cli.train  # noqa: F401  (installs the log filter, as train.py does)
from ldm.callbacks.progress import ProgressBar


@pytest.mark.parametrize(("max_epochs", "max_steps", "expected"), [(None, 6, "Epoch 0"), (-1, 6, "Epoch 0"),
                                                                    (3, -1, "Epoch 0/2")])
def test_progress_bar_counts_epochs_only_when_they_are_bounded(max_epochs, max_steps, expected) -> None:
    bar = ProgressBar()
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, callbacks=[bar], logger=False,
                        enable_checkpointing=False, accelerator="cpu")
    bar.setup(trainer, Lin(), "fit")
    assert bar._get_train_description(0).strip() == expected  # was "Epoch 0/-2" for step-bounded runs


def test_lightning_tip_is_not_printed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    assert "GPU available" in caplog.text  # Lightning's own notes still come through
    assert "litlogger" not in caplog.text and "Tip" not in caplog.text


def test_wandb_logger_does_not_pass_the_deprecated_anonymous_setting() -> None:
    from ldm.lightning.wandb_logger import WandbLogger

    assert "anonymous" not in WandbLogger(project="ldm", offline=True)._wandb_init  # W&B warned on every run
    assert WandbLogger(project="ldm", offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"
