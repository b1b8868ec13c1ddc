"""Samples a fixed set of prompts with fixed seeds every N steps (and at the end) with the EMA weights, and logs the
grid, so runs of a sweep show the same images at the same steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm.callbacks.pipeline import SamplingCallback
from ldm.inference.sampling_options import SamplingOptions
from ldm.utils.images import image_grid, log_image_grid
from ldm.utils.logging import get_logger, logger_step

log = get_logger(__name__)


class SampleImages(SamplingCallback):
    """Generate `prompts` x `images_per_prompt` in batches of `batch_size` (small: sampling at 256 px runs beside
    the training state in GPU memory), one grid row per prompt; rank 0 logs the grid.

    Every rank samples: under trainer=fsdp each UNet forward gathers the weights from all ranks, so all must run
    it; under ddp the other ranks would otherwise only wait for rank 0 at the next gradient all-reduce.

    Args:
        every_n_steps: sample when the global step is a multiple of this; 0 only at the end of training.
        sampling: the conf/sampling/ keys (a SamplingOptions or a mapping of some of them); default 25 steps.
        use_ema: sample with the EMA callback's weights when the run has one.
        aspects: aspect ratios "W:H" sampled too, each its own grid (`samples_16x9`) at the nearest size the model
            takes (pipeline.aspect_size): for runs trained on aspect-ratio buckets.
    """

    def __init__(self, prompts: Sequence[str], images_per_prompt: int = 4, seed: int = 0, every_n_steps: int = 1000,
                 sampling: SamplingOptions | Mapping[str, Any] | None = None, batch_size: int = 8,
                 use_ema: bool = True, resolution: int | None = None,
                 aspects: Sequence[str] | None = None) -> None:
        if not prompts:
            raise ValueError("SampleImages needs at least one prompt")
        super().__init__(every_n_steps, sampling=sampling if sampling is not None else {"steps": 25},
                         use_ema=use_ema, resolution=resolution)
        self.prompts, self.images_per_prompt, self.seed = list(prompts), images_per_prompt, seed
        self.batch_size, self.aspects = batch_size, list(aspects or [])

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """Generate and log the grid (one per aspect ratio, with `aspects`); returns the square grid's images
        (P * N, 3, H, W) in [-1, 1]."""
        jobs = [(p, self.seed + i) for p in self.prompts for i in range(self.images_per_prompt)]
        with self.pipeline(trainer, pl_module) as pipeline:
            sizes = {"": None, **{a: pipeline.aspect_size(a) for a in self.aspects}}
            grids = {}
            for aspect, size in sizes.items():
                hw = {} if size is None else {"height": size[0], "width": size[1]}
                grids[aspect] = torch.cat([pipeline.generate([p for p, _ in chunk], [s for _, s in chunk],
                                                             **self.options, **hw).images.cpu()
                                           for chunk in (jobs[i:i + self.batch_size]
                                                         for i in range(0, len(jobs), self.batch_size))])
        for aspect, images in grids.items():
            self._log(trainer, images, f"samples_{aspect.replace(':', 'x')}" if aspect else "samples")
        return grids[""]

    @rank_zero_only
    def _log(self, trainer: L.Trainer, images: torch.Tensor, key: str = "samples") -> None:
        grid = image_grid(images, nrow=self.images_per_prompt)
        out_dir = Path(trainer.default_root_dir) / "images" if trainer.default_root_dir else None
        log_image_grid(trainer.loggers, key, grid, trainer.global_step, fallback_dir=out_dir,
                       caption=" | ".join(self.prompts), log_step=logger_step(trainer))
