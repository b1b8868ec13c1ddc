"""Exponential moving average of one submodule's weights, kept outside the DDP wrapper.

Written instead of Lightning's `EMAWeightAveraging` because that one averages the whole LightningModule
(in stage 2 that copies and re-averages the frozen autoencoder and text encoder every step) and replaces the
checkpoint's `state_dict` with the averages; here only the trained submodule is averaged, the raw weights
stay the checkpoint's weights, and the EMA sits beside them under `callbacks` with its own step count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from ldm.lightning.sharding import copy_full_into, full_tensor


class EMA(L.Callback):
    """EMA of `pl_module.<attribute>` with the warm-up decay `min(decay, (1 + n) / (10 + n))`.

    The average is used for validation (weights are swapped in and out) and is what samplers load as
    "EMA weights". Parameters frozen when fitting starts (a LoRA run's base backbone) are their own average: the
    EMA holds them as views of the live tensors, not copies, so they cost no memory and no update time.
    """

    def __init__(self, attribute: str = "backbone", decay: float = 0.9999, start_step: int = 0,
                 every_n_steps: int = 1, warmup: bool = True, validate_with_ema: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.attribute, self.decay, self.start_step = attribute, decay, start_step
        self.every_n_steps, self.warmup, self.validate_with_ema = every_n_steps, warmup, validate_with_ema
        self.ema: dict[str, torch.Tensor] | None = None  # the averaged state dict of the target
        self._params: set[str] = set()
        self._frozen: set[str] = set()  # entries that are views of the live tensors
        self._live: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._pending_state: dict[str, Any] | None = None
        self._last_step = -1

    def _target(self, pl_module: L.LightningModule) -> nn.Module:
        target = getattr(pl_module, self.attribute, None)
        if not isinstance(target, nn.Module):
            raise ValueError(f"EMA(attribute={self.attribute!r}): the LightningModule has no such submodule.")
        return target

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Tensors, not a module copy: a sharded (FSDP2) UNet cannot be deep-copied, and its DTensor shards
        # average elementwise like plain tensors.
        target = self._target(pl_module)
        named = {**dict(target.named_buffers()), **dict(target.named_parameters())}
        self._live = {k: named[k] for k in target.state_dict()}  # the saved entries, as the live tensors
        self._params = {name for name, p in target.named_parameters() if p.requires_grad}
        self._frozen = {name for name, p in target.named_parameters() if not p.requires_grad}
        self.ema = {k: v.detach() if k in self._frozen else v.detach().clone() for k, v in self._live.items()}
        if self._pending_state is not None:
            self._load_into_ema(self._pending_state)
            self._pending_state = None

    def _pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, average, live tensor) for every entry of the target's state dict but the frozen parameters."""
        return [(k, e, self._live[k]) for k, e in self.ema.items() if k not in self._frozen]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.ema is None or step == self._last_step or step < self.start_step or step % self.every_n_steps:
            return
        self._last_step = step
        decay = self.current_decay()
        pairs = self._pairs()
        params = [(e, cur.detach()) for k, e, cur in pairs if k in self._params]
        torch._foreach_lerp_([e for e, _ in params], [c for _, c in params], 1.0 - decay)  # ema += (1-d)(cur-ema)
        for k, e, cur in pairs:
            if k not in self._params:  # buffers follow the live model
                e.copy_(cur)
        self.num_updates += 1

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        for _, e, p in self._pairs():
            tmp = p.detach().clone()
            p.copy_(e)
            e.copy_(tmp)

    @contextmanager
    def averaged(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Inside the block the module's weights are the EMA (no-op before the first update)."""
        if self.ema is None:
            yield
            return
        self._swap(pl_module)
        try:
            yield
        finally:
            self._swap(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and self.validate_with_ema and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and self.validate_with_ema and not trainer.sanity_checking:
            self._swap(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"num_updates": self.num_updates, "decay": self.decay, "attribute": self.attribute,
                "state_dict": {k: full_tensor(v).detach().cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:  # restored before fit starts: apply once the copy exists
            self._pending_state = state_dict
        else:
            self._load_into_ema(state_dict)

    def _load_into_ema(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        saved = state["state_dict"]
        if set(saved) != set(self.ema):
            raise ValueError(f"The checkpoint's EMA of {self.attribute!r} does not match the model: missing "
                             f"{sorted(set(self.ema) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(self.ema))[:5]}")
        for k, e in self.ema.items():
            if k not in self._frozen:  # a frozen parameter's average is the live weight itself
                copy_full_into(e, saved[k])
