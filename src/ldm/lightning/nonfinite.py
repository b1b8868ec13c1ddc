"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, and stop when it persists."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy

from ldm.utils.logging import get_logger

log = get_logger(__name__)


class NonFiniteGuard:
    """Decides, identically on every rank, whether a step may be applied.

    Ranks must agree, or one rank skips a backward that the others all-reduce and DDP hangs; so the
    finite flag is reduced with `min` across ranks before anyone acts on it.
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def all_finite(self, strategy: Strategy | None, *values: torch.Tensor) -> bool:
        """True when every value is finite on every rank; counts and eventually raises otherwise."""
        flag = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().float()
        if strategy is not None:
            flag = strategy.reduce(flag, reduce_op="min")
        if bool(flag > 0):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        log.warning(f"Non-finite loss or gradient: step skipped ({self.consecutive} in a row, {self.total} in all).")
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} consecutive training steps had a NaN/Inf loss or gradient; stopping so the "
                "weights are not poisoned. Lower the learning rate, enable gradient clipping, or check the data "
                "(the last good weights are in checkpoints/last.ckpt)."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
