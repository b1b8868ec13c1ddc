"""The final `last.ckpt` of a run that stops mid-epoch is written at its last batch, so its loop state is that of a
periodic save (epoch not completed) and `ckpt_path=last` continues the same epoch's data (tests/test_resume.py
checks that end to end)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from conftest import Lin

from ldm.callbacks.model_checkpoint import ModelCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class StopAt(L.Callback):
    """Requests a stop at a step, as Lightning's Timer (max_time) or early stopping would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(tmp_path: Path, callbacks: list, **trainer_kwargs) -> dict:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last=True, save_top_k=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[checkpoint, *callbacks], **trainer_kwargs)
    trainer.fit(Lin(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(40, 3), batch_size=4))  # 10/epoch
    return torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize(("callbacks", "kwargs", "step"), [([], {"max_steps": 14}, 14),
                                                            ([StopAt(6)], {"max_epochs": 3}, 6)],
                         ids=["max_steps", "should_stop"])
def test_a_mid_epoch_stop_saves_the_epoch_as_unfinished(tmp_path: Path, callbacks: list, kwargs: dict,
                                                        step: int) -> None:
    ckpt = fit(tmp_path, callbacks, **kwargs)
    assert ckpt["global_step"] == step
    assert ckpt["epoch"] == step // 10  # the epoch the last batch belongs to, not the next one
    progress = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["started"] == step // 10 + 1 and progress["completed"] == step // 10


def test_a_run_that_ends_with_its_last_epoch_is_saved_once_at_the_end(tmp_path: Path) -> None:
    ckpt = fit(tmp_path, [], max_epochs=2)
    assert ckpt["global_step"] == 20 and ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 2
