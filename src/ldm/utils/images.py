"""Turn image batches into grids and send them to whichever loggers the run has."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def image_grid(images: Tensor, nrow: int = 8) -> Image.Image:
    """A PIL grid of a [-1, 1] batch."""
    grid = make_grid(to_uint8(images), nrow=nrow, padding=2)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def log_image_grid(loggers: list[Logger], key: str, grid: Image.Image, step: int,
                   fallback_dir: str | Path | None = None, caption: str | None = None,
                   log_step: int | None = None) -> None:
    """Log to W&B when present; always also write a PNG under `fallback_dir` so runs without W&B keep images.

    `step` names the PNG (the global step, as checkpoints do); `log_step` is the loggers' axis (default `step`).
    """
    from lightning.pytorch.loggers import WandbLogger  # here: sample.py uses this module without Lightning

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step if log_step is None else log_step, caption=[caption] if caption else None)
    if fallback_dir is not None:
        path = Path(fallback_dir) / f"{key.replace('/', '_')}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
