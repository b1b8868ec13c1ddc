"""The stage-2 training step never waits for the device (issue 15): the NaN/Inf guard decides on the device (fused
AdamW's found_inf skips the update), and nothing in the step, EMA, progress bar or logging converts a tensor to a
Python value outside the reporting steps (every `log_every_n_steps`). On the CPU a host synchronisation cannot be
observed, so the test counts what causes one on CUDA: tensor -> Python conversions."""

from __future__ import annotations

import traceback
from collections import Counter
from functools import partial
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from test_diffusion_module import parts

from ldm.callbacks.data_health import DataHealth
from ldm.callbacks.ema import EMA
from ldm.callbacks.progress import ProgressBar
from ldm.callbacks.throughput import Throughput
from ldm.lightning.diffusion_module import DiffusionModule

pytestmark = pytest.mark.usefixtures("one_thread")


def module(max_nonfinite_steps: int = 20) -> DiffusionModule:
    from ldm.diffusion.losses import DenoisingLoss
    from ldm.diffusion.parameterization import VPrediction
    from ldm.diffusion.process import DiffusionProcess
    from ldm.diffusion.schedules import CosineSchedule

    ae, unet, text = parts()
    schedule = CosineSchedule()
    return DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae,
                           process=DiffusionProcess(schedule, VPrediction(schedule)), loss=DenoisingLoss(),
                           optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True),
                           max_nonfinite_steps=max_nonfinite_steps)


def batches(n: int, nan_at: set[int] = frozenset()) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        latent = torch.randn(2, 2, 4, 8, 8, generator=g)  # cached posterior (mean, std)
        latent[:, 1] = latent[:, 1].abs() * 0.1
        if i in nan_at:
            latent[0, 0, 0, 0, 0] = float("nan")
        out.append({"latent": latent, "caption": ["a red square", "a blue circle"],
                    "skips": {"decode_error": torch.tensor([i % 2, 0])}})  # per-worker counts, as the loader sends
    return out


def fit(m: DiffusionModule, data: list[dict], callbacks: list, log_every: int, logger: Any = False) -> L.Trainer:
    trainer = L.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", gradient_clip_val=1.0, log_every_n_steps=log_every, callbacks=callbacks,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


class Snapshots(L.Callback):
    """The backbone's weights and optimizer state after every step."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.steps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append([p.detach().clone() for p in pl_module.backbone.parameters()])
        state = trainer.optimizers[0].state
        self.steps.append(max(float(s["step"]) for s in state.values()) if state else 0.0)


def test_a_nan_batch_skips_its_update_on_the_device_and_is_reported() -> None:
    m, snaps = module(), Snapshots()
    fit(m, batches(8, nan_at={4}), [snaps], log_every=4)
    same = [all(torch.equal(a, b) for a, b in zip(snaps.weights[i - 1], snaps.weights[i])) for i in range(1, 8)]
    assert same == [False, False, False, True, False, False, False]  # step 4 (the NaN batch) changed nothing
    assert snaps.steps == [1, 2, 3, 4, 4, 5, 6, 7]  # AdamW's step count did not advance on it either
    assert all(torch.isfinite(p).all() for p in m.backbone.parameters())
    assert m.guard.total == 1 and m.guard.consecutive == 0  # read back at a reporting step


def test_persistent_nan_stops_at_the_next_report_with_a_clear_message() -> None:
    m = module(max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive training steps had a NaN/Inf loss"):
        fit(m, batches(12, nan_at={1, 2, 3, 4, 5, 6}), [], log_every=4)


class ConversionCounter(L.Callback):
    """Counts tensor -> Python conversions (each one a host synchronisation on CUDA) per training step, from the
    start of a step to the start of the next, with where they came from."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    # Functions that convert tensors which live on the CPU in every run (not a synchronisation on CUDA either):
    # the tokenizer's token ids.
    HOST_ONLY = {"tokenize"}

    def __init__(self) -> None:
        self.per_step: Counter[int] = Counter()
        self.where: dict[int, list[str]] = {}
        self.step: int | None = None
        self._saved: dict[str, Any] = {}

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = traceback.extract_stack(limit=2)[0]
            if self.step is not None and frame.name not in self.HOST_ONLY:
                self.per_step[self.step] += 1
                self.where.setdefault(self.step, []).append(f"{name} at {frame.filename}:{frame.lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def on_train_start(self, trainer, pl_module) -> None:
        for name in self.NAMES:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.step = None
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_no_host_synchronisation_outside_the_reporting_steps(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    counter, n, log_every = ConversionCounter(), 13, 4
    health = DataHealth(every_n_steps=log_every)
    # first in the list: its batch-start hook runs before the other callbacks'
    fit(module(), batches(n), [counter, ProgressBar(), EMA(decay=0.9), health, Throughput()], log_every=log_every,
        logger=CSVLogger(tmp_path))
    counter.on_train_end(None, None)
    reporting = {s for s in range(n) if (s + 1) % log_every == 0 or s % log_every == 0}
    # step 0 warms up (lazy optimizer state, the prompt cache's first fill): not a steady-state step
    offenders = {s: counter.where[s] for s in range(1, n) if counter.per_step[s] and s not in reporting}
    assert not offenders, offenders
    assert any(counter.per_step[s] for s in reporting)  # the counter does see the reports
    assert health.state_dict()["local"]["decode_error"] == n // 2  # the skips counted on the device all arrive
