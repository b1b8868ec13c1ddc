"""Every rank's RNG states (torch, CUDA, numpy, python) in the checkpoint, restored when training restarts, so a
resumed run draws the same noise levels, noise and caption dropout as an uninterrupted one.

Lightning seeds once at start and does not save generator states; with the data position (WebDataModule) and the
optimizer/EMA/scheduler states this makes `ckpt_path=last` continue exactly (tests/test_resume.py)."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.distributed as dist

from ldm.utils.logging import get_logger

log = get_logger(__name__)


def collect_rng_states() -> dict[str, Any]:
    """This process's generator states as tensors and plain Python values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGState(L.Callback):
    """Saves the RNG states of all ranks (gathered) and gives each rank its own back at the start of training.

    States are restored in `on_train_start`, after the sanity-check validation, which would otherwise consume
    random numbers that the uninterrupted run never drew.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = collect_rng_states()
        if dist.is_available() and dist.is_initialized():  # every rank runs checkpointing, so this gather is safe
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._pending:
            return
        if len(self._pending) != trainer.world_size:
            log.warning(f"The checkpoint holds RNG states of {len(self._pending)} ranks but this run has "
                        f"{trainer.world_size}: random streams restart from the seed (the resume is not exact).")
        else:
            set_rng_states(self._pending[trainer.global_rank])
        self._pending = None
