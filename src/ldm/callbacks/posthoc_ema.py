"""Post-hoc EMA during training (EDM2, Karras et al. 2024): power-function EMAs of one submodule, written as snapshots
every N steps, from which `scripts/posthoc_ema.py` rebuilds the EMA of any length after training (ldm.posthoc_ema).
It runs beside the classic `EMA` callback, which stays the weights that validation and samplers use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm.lightning.sharding import copy_full_into, full_tensor
from ldm.posthoc_ema import ema_beta, save_snapshot, sigma_rel_to_gamma, snapshot_name
from ldm.utils.logging import get_logger

log = get_logger(__name__)


class PostHocEMA(L.Callback):
    """Power-function EMAs of `pl_module.<attribute>` for each of `sigma_rels`, updated every step with
    beta_t = (1 - 1/t)^(gamma + 1), and a snapshot of all of them every `snapshot_every` steps (and at the end of
    training) in `snapshot_dir`. The averages are in the checkpoint, so a resumed run writes the same snapshots.

    Args:
        sigma_rels: the tracked EMA lengths relative to the training time (EDM2: 0.05 and 0.10); any length between
            and somewhat beyond them is rebuilt well.
        snapshot_every: steps between snapshots; EDM2 keeps ~100-200 per run, the reconstruction error grows fast
            below ~10 (bench numbers in tests/test_posthoc_ema.py).
        snapshot_dir: default `<run>/posthoc_ema` (the trainer's default_root_dir).
    """

    def __init__(self, attribute: str = "backbone", sigma_rels: Sequence[float] = (0.05, 0.10),
                 snapshot_every: int = 1000, snapshot_dir: str | None = None) -> None:
        if not sigma_rels or snapshot_every < 1:
            raise ValueError(f"PostHocEMA needs at least one sigma_rel and snapshot_every >= 1, got "
                             f"sigma_rels={list(sigma_rels)}, snapshot_every={snapshot_every}")
        self.gammas = [sigma_rel_to_gamma(float(s)) for s in sigma_rels]  # checks the range
        self.attribute, self.sigma_rels = attribute, [float(s) for s in sigma_rels]
        self.snapshot_every, self.snapshot_dir = snapshot_every, snapshot_dir
        self.averages: list[dict[str, torch.Tensor]] | None = None
        self.step = 0  # updates so far: the t of the last update
        self._live: dict[str, torch.Tensor] = {}
        self._params: set[str] = set()  # the averaged entries: trainable parameters
        self._frozen: set[str] = set()  # frozen parameters, held as views of the live tensors
        self._pending: dict[str, Any] | None = None
        self._last_snapshot = -1

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.snapshot_dir or Path(trainer.default_root_dir) / "posthoc_ema")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = getattr(pl_module, self.attribute, None)
        if not isinstance(target, torch.nn.Module):
            raise ValueError(f"PostHocEMA(attribute={self.attribute!r}): the LightningModule has no such submodule.")
        named = {**dict(target.named_buffers()), **dict(target.named_parameters())}
        self._live = {k: named[k] for k in target.state_dict()}  # DTensor shards under FSDP2: averaged elementwise
        # Parameters frozen when fitting starts (a LoRA run's base backbone) are their own average at every sigma_rel:
        # views of the live tensors, as in the EMA callback, so they cost no memory and no update time.
        self._params = {name for name, p in target.named_parameters() if p.requires_grad}
        self._frozen = {name for name, p in target.named_parameters() if not p.requires_grad}
        self.averages = [{k: v.detach() if k in self._frozen else v.detach().clone() for k, v in self._live.items()}
                         for _ in self.sigma_rels]
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        averaged = sum(full_size(v) for k, v in self._live.items() if k in self._params)
        size = averaged * len(self.sigma_rels) + sum(full_size(v) for k, v in self._live.items() if k not in self._params)
        count = trainer.max_steps // self.snapshot_every if trainer.max_steps and trainer.max_steps > 0 else None
        total = f", {count} snapshots by max_steps={trainer.max_steps}: {count * size / 2**30:.2f} GiB" if count else ""
        log.info(f"Post-hoc EMA: sigma_rel {self.sigma_rels}, a snapshot every {self.snapshot_every} steps in "
                 f"{self.folder(trainer)}, {size / 2**20:.1f} MiB each{total}")

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.averages is None or trainer.global_step == self.step:  # no optimizer step (accumulation)
            return
        self.step = trainer.global_step
        live = [(k, v.detach()) for k, v in self._live.items()]
        for gamma, average in zip(self.gammas, self.averages):
            params = [(average[k], v) for k, v in live if k in self._params]
            weight = 1.0 - ema_beta(self.step, gamma)  # 1 at t = 1: the average starts at the first step's weights
            torch._foreach_lerp_([a for a, _ in params], [v for _, v in params], weight)
            for k, v in live:
                if k not in self._params and k not in self._frozen:  # buffers follow the live model
                    average[k].copy_(v)
        if self.step % self.snapshot_every == 0:
            self._snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.averages is not None and self.step > 0 and self._last_snapshot != self.step:
            self._snapshot(trainer)

    def _snapshot(self, trainer: L.Trainer) -> None:
        self._last_snapshot = self.step
        full = [{k: full_tensor(v) for k, v in average.items()} for average in self.averages]  # a collective: all ranks
        if trainer.is_global_zero:
            buffers = sorted(set(self._live) - self._params)  # and frozen parameters: not averaged, taken as they are
            save_snapshot(self.folder(trainer) / snapshot_name(self.step), self.step, full, self.sigma_rels, buffers)

    def state_dict(self) -> dict[str, Any]:
        if self.averages is None:
            return {}
        return {"step": self.step, "sigma_rels": self.sigma_rels, "attribute": self.attribute, "posthoc": True,
                "averages": [{k: full_tensor(v).detach().cpu() for k, v in avg.items()} for avg in self.averages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.averages is None:
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(f"The checkpoint tracked post-hoc EMA sigma_rels {state['sigma_rels']}, this run "
                             f"{self.sigma_rels}: resume with the same callbacks.posthoc_ema.sigma_rels.")
        self.step = int(state["step"])
        self._last_snapshot = self.step  # its snapshot, if due, was written before the checkpoint
        for average, saved in zip(self.averages, state["averages"]):
            for k, v in average.items():
                if k not in self._frozen:  # a frozen parameter's average is the live weight itself
                    copy_full_into(v, saved[k])


def full_size(t: torch.Tensor) -> int:
    """Bytes of the whole tensor (a DTensor's global shape, not this rank's shard)."""
    return t.numel() * t.element_size()
