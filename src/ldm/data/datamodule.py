"""LightningDataModule around `ShardLoader`: train/val image-caption batches from WebDataset shards, split
across DDP ranks and DataLoader workers without needing torch.distributed."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
from torch.utils.data import DataLoader

from ldm.data.buckets import resolve_buckets
from ldm.data.latent_cache import read_card
from ldm.data.shards import expand_urls
from ldm.data.webdataset import DEFAULT_MAX_PIXELS, ShardLoader


class WebDataModule(L.LightningDataModule):
    """Batches are dicts: image (B, 3, H, W) in [-1, 1], caption list[str], key list[str], skips dict.

    Epoch-mode lengths vary slightly per epoch (shards are reshuffled); with the Trainer's
    `reload_dataloaders_every_n_epochs=1` Lightning runs each epoch's exact length (reloading is free here).

    Args:
        train_shards: brace pattern (`shards/{00000..00099}.tar`), directory, list, or URLs/`pipe:`.
        mode: "epoch" (each sample at most once per epoch, equal batch counts on all ranks) or "resampled"
            (infinite stream, `batches_per_epoch` batches per rank).
        min_side: images whose shorter side is below this are skipped as too_small.
        max_pixels: images above this many pixels (from the header, before decoding) are skipped as too_large.
        metadata_filters: json thresholds, e.g. {"min_width": 256, "aesthetic": 5.0} (json[key] >= value).
        latents: the shards are a latent cache (scripts/cache_latents.py): batches carry "latent" instead of
            "image", and `cache_card` gives the cache's identity for stage 2 to check.
        text_states: with a latent cache that holds its captions' text-encoder states (cache_latents.py
            text_encoder=...), batches carry them ("text") and stage 2 runs no text encoder on them; false ignores
            them. Stage 2 checks at start-up that they come from its own (frozen) text encoder.
        buckets: aspect-ratio buckets for training (validation stays square at `resolution`): True makes them
            (ldm.data.buckets.make_buckets(resolution, bucket_multiple, bucket_max_ratio)), a list gives (h, w)
            sizes, each side a multiple of `bucket_multiple` (the autoencoder's factor x the backbone's multiple).
        split: how epoch mode deals data to the readers (ranks x workers): "shard" whole shards, "sample" every
            shard's samples in turn (each reader reads every shard, decodes its own), "auto" samples below 4 shards
            per reader, where whole shards would leave the readers unequal (ShardLoader).
        overfit_batches: debugging (`debug=overfit`): every epoch is the first N batches of epoch 0, held in
            memory. Lightning's own `overfit_batches` cannot do this for a streaming loader, which reshuffles.
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None, resolution: int,
                 batch_size: int, num_workers: int = 2, mode: Literal["epoch", "resampled"] = "epoch",
                 batches_per_epoch: int | None = None, val_batch_size: int | None = None,
                 crop: Literal["center", "random"] = "random", flip: bool = True, min_side: int = 8,
                 max_pixels: int = DEFAULT_MAX_PIXELS, metadata_filters: dict[str, float] | None = None,
                 samples_per_shard: int | None = None, shuffle_buffer: int = 500, pin_memory: bool = False,
                 seed: int = 0, latents: bool = False, overfit_batches: int = 0,
                 buckets: bool | Sequence[Sequence[int]] = False, bucket_multiple: int = 64,
                 bucket_max_ratio: float = 2.0, split: Literal["auto", "shard", "sample"] = "auto",
                 text_states: bool = True):
        super().__init__()
        self.save_hyperparameters(logger=False)  # in the checkpoint; loggers get them as data.* of the config
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.mode, self.batches_per_epoch = mode, batches_per_epoch
        self.val_batch_size = val_batch_size or batch_size
        self.crop, self.flip, self.min_side, self.max_pixels = crop, flip, min_side, max_pixels
        self.metadata_filters = dict(metadata_filters) if metadata_filters else None
        self.samples_per_shard, self.shuffle_buffer, self.seed = samples_per_shard, shuffle_buffer, seed
        self.pin_memory, self.latents, self.text_states = pin_memory, latents, text_states
        if overfit_batches < 0:
            raise ValueError(f"overfit_batches must be >= 0 (0: off), got {overfit_batches}")
        self.overfit_batches = overfit_batches
        self.buckets = resolve_buckets(buckets, resolution, bucket_multiple, bucket_max_ratio)
        self.split = split
        self._overfit: list[dict[str, Any]] | None = None
        self.train_loader: ShardLoader | None = None
        self._resume_position: tuple[int, int] | None = None
        self.val_loader: ShardLoader | None = None

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _common(self, rank: int, world_size: int) -> dict:
        return {"resolution": self.resolution, "rank": rank, "world_size": world_size, "min_side": self.min_side,
                "max_pixels": self.max_pixels, "metadata_filters": self.metadata_filters,
                "samples_per_shard": self.samples_per_shard, "pin_memory": self.pin_memory, "seed": self.seed,
                "latents": self.latents, "text_states": self.uses_text_states}

    def _cache_buckets(self) -> int | None:
        """A latent cache's number of sizes (its card's `buckets`), for the epoch length."""
        card = self.cache_card
        return len(card.get("buckets") or []) or None if card else None

    @property
    def uses_text_states(self) -> bool:
        """Whether batches carry cached text states: a latent cache that holds them, and `text_states` true."""
        return bool(self.text_states and (self.cache_card or {}).get("text_encoder"))

    @property
    def cache_card(self) -> dict | None:
        """The latent cache's `latent_cache.json` (None for image shards): which autoencoder wrote it."""
        if not self.latents:
            return None
        first = Path(expand_urls(self.train_shards)[0])
        return read_card(first.parent) | {"path": str(first.parent)}

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists now, so a wrong path fails before training starts."""
        rank, world_size = self._rank()
        common = self._common(rank, world_size)
        if stage in (None, "fit") and self.train_loader is None:
            self.train_loader = ShardLoader(
                self.train_shards, batch_size=self.batch_size, mode=self.mode, num_workers=self.num_workers,
                batches_per_epoch=self.batches_per_epoch, shuffle=True, shuffle_buffer=self.shuffle_buffer,
                crop=self.crop, flip=self.flip, buckets=None if self.latents else self.buckets,
                num_buckets=self._cache_buckets(), split=self.split, **common)
        if stage in (None, "fit", "validate") and self.val_shards is not None and self.val_loader is None:
            self.val_loader = self._make_val_loader(common, world_size)

    def _make_val_loader(self, common: dict, world_size: int) -> ShardLoader:
        # Validation sets are often one or two shards: use only as many workers as the split allows.
        num_shards = len(expand_urls(self.val_shards))  # type: ignore[arg-type]
        workers = min(self.num_workers, num_shards // world_size)
        return ShardLoader(self.val_shards, batch_size=self.val_batch_size, mode="epoch", num_workers=workers,
                           shuffle=False, shuffle_buffer=0, drop_last=world_size > 1, crop="center", flip=False,
                           **common)

    def train_dataloader(self) -> ShardLoader | DataLoader:
        if self.train_loader is None:
            self.setup("fit")
        assert self.train_loader is not None
        if self.overfit_batches:
            return self._overfit_batches()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:  # so len() is this epoch's when Lightning reloads loaders every epoch
            self.train_loader.set_epoch(trainer.current_epoch)
        if self._resume_position is not None:
            self.train_loader.resume_after(*self._resume_position)
            self._resume_position = None
        return self.train_loader

    def _overfit_batches(self) -> DataLoader:
        if self._overfit is None:
            assert self.train_loader is not None
            self.train_loader.set_epoch(0)
            batches = list(itertools.islice(iter(self.train_loader), self.overfit_batches))
            if len(batches) < self.overfit_batches:
                raise ValueError(f"data.overfit_batches={self.overfit_batches}, but an epoch holds only "
                                 f"{len(batches)} batches")
            # skip counts belong to the stream, not to each replay of the batch
            self._overfit = [{k: v for k, v in b.items() if k != "skips"} for b in batches]
        return DataLoader(self._overfit, batch_size=None)  # the batches as they are, in order

    # The data position, saved in every checkpoint: the epoch and how many of its batches were trained on. Lightning
    # restores its own step and batch counters and ends the epoch after the remaining batches; the loader skips the
    # ones already seen, so a resumed run sees exactly the samples an uninterrupted one would have.
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # At a mid-epoch save (on_train_batch_end) `processed` counts this epoch's trained batches, this one included.
        return {"epoch": trainer.current_epoch,
                "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_shards is None:
            return []
        if self.val_loader is None:
            self.setup("validate")
        assert self.val_loader is not None
        return self.val_loader


class LatentDataModule(WebDataModule):
    """A latent cache folder (`root/train`, optional `root/val`) written by scripts/cache_latents.py.

    `resolution` must be the one the cache was written at: a cache of another resolution is refused at set-up.
    """

    def __init__(self, root: str, resolution: int, batch_size: int, **kwargs: Any) -> None:
        val = Path(root) / "val"
        super().__init__(train_shards=str(Path(root) / "train"), val_shards=str(val) if val.is_dir() else None,
                         resolution=resolution, batch_size=batch_size, latents=True, **kwargs)
        self.root = root

    def setup(self, stage: str | None = None) -> None:
        if not (Path(self.root) / "train").is_dir():
            raise FileNotFoundError(f"data.root={self.root} has no train/ folder: write the cache first with "
                                    "python scripts/cache_latents.py autoencoder=<export> source=<shards> "
                                    f"out={self.root} resolution={self.resolution}")
        card = self.cache_card or {}
        if card.get("resolution") != self.resolution:
            raise ValueError(f"The latent cache {self.root} was written at resolution {card.get('resolution')}, but "
                             f"data.resolution={self.resolution}. Re-cache at {self.resolution} or set "
                             f"data.resolution={card.get('resolution')}.")
        super().setup(stage)
