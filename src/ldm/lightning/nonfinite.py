"""Skip optimizer steps whose loss or gradients are NaN/Inf, count them, and stop when it persists.

The decision stays on the device: `finite()` returns a 0-dim tensor and keeps the counts in device tensors, so a
normal step never waits for the GPU (a `bool(flag)` per step stalls the launch queue and rules out CUDA graphs).
The host reads the counts only in `report()`, every `log_every_n_steps`, as GradScaler's `found_inf` is consumed
by the optimizer without a sync and read back only by its `update()`.
"""

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
        self.consecutive = 0  # host copies, as of the last report
        self.total = 0
        self._counts: torch.Tensor | None = None  # device: (consecutive, total, longest run since the last report)

    def finite(self, strategy: Strategy | None, *values: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: every value finite on every rank. Counts on the device; no host synchronisation."""
        flag = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().float()
        if strategy is not None:
            flag = strategy.reduce(flag, reduce_op="min")
        if self._counts is None or self._counts.device != flag.device:
            self._counts = torch.tensor([self.consecutive, self.total, self.consecutive], dtype=torch.float32,
                                        device=flag.device)
        bad = 1.0 - flag
        consecutive = (self._counts[0] + 1.0) * bad  # back to 0 on a finite step
        self._counts = torch.stack([consecutive, self._counts[1] + bad, torch.maximum(self._counts[2], consecutive)])
        return flag > 0

    def report(self) -> None:
        """Read the counts back (one host synchronisation): warn about steps skipped since the last report, and
        raise when a run of `max_consecutive` skipped steps happened."""
        if self._counts is None:
            return
        consecutive, total, longest = (int(v) for v in self._counts.tolist())
        skipped, self.consecutive, self.total = total - self.total, consecutive, total
        self._counts = torch.stack([self._counts[0], self._counts[1], self._counts[0]])
        if skipped:
            log.warning(f"Non-finite loss or gradient: {skipped} step(s) skipped since the last report "
                        f"({consecutive} in a row now, {total} in all).")
        if longest >= self.max_consecutive:
            raise RuntimeError(
                f"{longest} consecutive training steps had a NaN/Inf loss or gradient; stopping so the "
                "weights are not poisoned. Lower the learning rate, enable gradient clipping, or check the data "
                "(the last good weights are in checkpoints/last.ckpt)."
            )

    def all_finite(self, strategy: Strategy | None, *values: torch.Tensor) -> bool:
        """`finite()` decided on the host at once (a synchronisation per call): for loops that branch on it."""
        flag = self.finite(strategy, *values)
        self.report()
        return bool(flag)

    def state_dict(self) -> dict[str, int]:
        if self._counts is None:
            return {"consecutive": self.consecutive, "total": self.total}
        consecutive, total = (int(v) for v in self._counts[:2].tolist())  # no report: a save never raises
        return {"consecutive": consecutive, "total": total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
        self._counts = None
