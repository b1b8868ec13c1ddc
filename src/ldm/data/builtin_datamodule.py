"""A WebDataModule over a built-in dataset, written to disk on first use (rank 0 only, idempotent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ldm.data.builtin import write_builtin
from ldm.data.datamodule import WebDataModule


class BuiltinDataModule(WebDataModule):
    """`shapes` or `digits` shards under `root/{train,val}`, then the same pipeline as any user shards."""

    def __init__(self, name: Literal["shapes", "digits"], root: str, num_train: int, num_val: int,
                 resolution: int, batch_size: int, shard_size: int = 256,
                 image_format: Literal["jpg", "png", "webp"] = "png", **kwargs: Any) -> None:
        self.builtin = {"name": name, "out_dir": root, "num_samples": num_train + num_val, "num_val": num_val,
                        "resolution": resolution, "shard_size": shard_size, "image_format": image_format}
        root_path = Path(root)
        super().__init__(train_shards=str(root_path / "train"),
                         val_shards=str(root_path / "val") if num_val else None,
                         resolution=resolution, batch_size=batch_size, **kwargs)

    def prepare_data(self) -> None:
        # The data seed is fixed (not the run seed): every run of every experiment sees the same dataset.
        write_builtin(**self.builtin, seed=0)
