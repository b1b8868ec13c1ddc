"""Throughput and cost of a run, logged as it trains: images/s, model TFLOP/s and MFU, peak memory, the share of the
step spent in forward + backward, and the GPU-hours and money the run will have cost when it reaches `max_steps`.

Timed on the host between reports (every `log_every_n_steps`), without synchronising with the device: over many
steps the host can run ahead of the GPU only by the launch queue's depth, so the rate is the device's. The
forward + backward share is timed on the device's own timeline (CUDA events at each step's start and after its
backward, read back at the reports): what the rest (optimizer, EMA, logging, waiting for data) costs the GPU."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as L
import torch

from ldm.utils.flops import bf16_peak_flops
from ldm.utils.logging import get_logger, logger_step

log = get_logger(__name__)
MAX_MARKS = 512  # steps whose events are kept for the forward + backward share


class Throughput(L.Callback):
    """Logs `perf/*` every `log_every_n_steps` training steps.

    Args:
        peak_tflops: the accelerator's peak for MFU, per device; default: its dense bf16 figure from
            `ldm.utils.flops.BF16_PEAK_TFLOPS` by name (none on the CPU: no MFU).
        price_per_gpu_hour: currency units per device-hour for the cost columns (0: not logged).
        warmup_steps: steps left out of the rate (compilation, cuDNN autotuning, allocator growth).
    """

    def __init__(self, peak_tflops: float | None = None, price_per_gpu_hour: float = 0.0,
                 warmup_steps: int = 2) -> None:
        if price_per_gpu_hour < 0 or (peak_tflops is not None and peak_tflops <= 0) or warmup_steps < 0:
            raise ValueError(f"Throughput: peak_tflops > 0, price_per_gpu_hour >= 0 and warmup_steps >= 0 expected, "
                             f"got {peak_tflops}, {price_per_gpu_hour}, {warmup_steps}")
        self.peak_tflops, self.price = peak_tflops, price_per_gpu_hour
        self.warmup_steps = warmup_steps
        self._base: tuple[tuple[int, int], float] | None = None  # (latent size, training FLOPs per sample there)
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._samples = 0
        self._flops = 0.0
        self._steps = 0
        self._marks: list[list[Any]] = []  # [start, after backward] per step since the last report

    @staticmethod
    def _mark(pl_module: L.LightningModule) -> Any:
        """A point on the device's timeline: a recorded CUDA event, or the host clock (CPU work is synchronous)."""
        if pl_module.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._start is None and trainer.global_step >= self.warmup_steps:
            self._start = time.perf_counter()
        if self._start is not None:
            self._marks = self._marks[1 - MAX_MARKS:]  # bounded between rare reports: the latest steps count
            self._marks.append([self._mark(pl_module), None])

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._marks:
            self._marks[-1][1] = self._mark(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._start is None:
            return
        size, hw = _batch_geometry(batch, pl_module)
        self._samples += size
        self._steps += 1
        if hw is not None and hasattr(pl_module, "training_flops_per_sample"):
            if self._base is None:  # once, at the same step on every rank (a sharded backbone gathers its weights)
                self._base = (hw, pl_module.training_flops_per_sample(hw))
            (h0, w0), base = self._base
            # Other sizes (aspect-ratio buckets) scale with the latent area: exact for convolutions and linears,
            # low by the attention's extra quadratic share; counting each bucket would need every rank to forward
            # the same bucket at the same step.
            self._flops += size * base * hw[0] * hw[1] / (h0 * w0)
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            metrics = self.measure(trainer, pl_module)
            share = self._fwd_bwd_share(self._mark(pl_module))
            if share is not None:
                metrics["perf/fwd_bwd_share"] = share
            for logger in trainer.loggers if trainer.is_global_zero else []:
                logger.log_metrics(metrics, step=logger_step(trainer))

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The figures since the warm-up, all devices together (every rank steps the same batch size)."""
        seconds = max(time.perf_counter() - self._start, 1e-9)
        world = trainer.world_size
        metrics = {"perf/images_per_s": self._samples * world / seconds,
                   "perf/seconds_per_step": seconds / max(self._steps, 1)}
        if self._flops:
            achieved = self._flops / seconds  # per device
            metrics["perf/tflops_per_device"] = achieved / 1e12
            peak = self.peak_tflops * 1e12 if self.peak_tflops else bf16_peak_flops(pl_module.device)
            if peak:
                metrics["perf/mfu"] = achieved / peak
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if trainer.max_steps and trainer.max_steps > 0:
            hours = trainer.max_steps * metrics["perf/seconds_per_step"] * world / 3600
            metrics["perf/gpu_hours_projected"] = hours
            if self.price:
                metrics["perf/cost_projected"] = hours * self.price
        return metrics


    def _fwd_bwd_share(self, end: Any) -> float | None:
        """Forward + backward time over step time, for the steps since the last report (ending at `end`); a report
        step, so reading the events back (a synchronisation) is allowed here."""
        marks, self._marks = [m for m in self._marks if m[1] is not None], []
        if not marks:
            return None
        if isinstance(end, torch.cuda.Event):
            end.synchronize()
            total = marks[0][0].elapsed_time(end)
            inside = sum(start.elapsed_time(after) for start, after in marks)
        else:
            total, inside = end - marks[0][0], sum(after - start for start, after in marks)
        return inside / total if total > 0 else None


def _batch_geometry(batch: Any, pl_module: L.LightningModule) -> tuple[int, tuple[int, int] | None]:
    """(samples in the batch, latent height and width) from a stage-2 batch of cached latents or images."""
    if not isinstance(batch, dict):
        return len(batch), None
    if "latent" in batch:  # (B, 2, c, h, w)
        return batch["latent"].shape[0], tuple(batch["latent"].shape[-2:])
    images = batch.get("image")
    if images is None:
        return len(next(iter(batch.values()))), None
    f = getattr(getattr(pl_module, "autoencoder", None), "downsample_factor", None)
    return images.shape[0], (images.shape[-2] // f, images.shape[-1] // f) if f else None
