"""Built-in toy datasets written as train/val shards: `shapes` (procedural coloured shapes) and `digits`
(scikit-learn's handwritten digits); both need no download."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ldm.data.builtin import digits, shapes
from ldm.data.shards import PIL_FORMATS, Sample, ShardSummary, write_shards

BUILTIN_DATASETS: dict[str, Callable[[int, int, int], Sample]] = {
    "shapes": shapes.make_sample,
    "digits": digits.make_sample,
}
MANIFEST = "dataset.json"
_FORMAT_VERSION = 1  # bump when the drawing code changes, so old outputs are rewritten


@dataclass
class BuiltinShards:
    root: Path
    train_shards: str  # brace pattern, absolute
    val_shards: str | None
    num_train: int
    num_val: int


def _pattern(root: Path, split: str, num_shards: int) -> str:
    return str(root / split / f"{{00000..{num_shards - 1:05d}}}.tar")


def _result(root: Path, manifest: dict[str, Any]) -> BuiltinShards:
    train, val = manifest["splits"]["train"], manifest["splits"].get("val")
    return BuiltinShards(root, _pattern(root, "train", train["num_shards"]),
                         _pattern(root, "val", val["num_shards"]) if val else None,
                         train["num_samples"], val["num_samples"] if val else 0)


def _is_complete(root: Path, args: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("args") != args:
        return None
    for split, info in manifest["splits"].items():
        for i in range(info["num_shards"]):
            if not (root / split / f"{i:05d}.tar").is_file() or not (root / split / f"{i:05d}_stats.json").is_file():
                return None
    return manifest


def _clear(root: Path) -> None:
    # Delete only what write_builtin itself writes, never a whole directory the user pointed us at.
    (root / MANIFEST).unlink(missing_ok=True)
    for split in ("train", "val"):
        for pattern in ("*.tar", "*.tar.tmp", "*_stats.json"):
            for path in (root / split).glob(pattern):
                path.unlink()


def _write_split(make: Callable[[int, int, int], Sample], out: Path, indices: range, *, seed: int,
                 resolution: int, shard_size: int, image_format: str) -> ShardSummary:
    samples = (make(seed, i, resolution) for i in indices)
    return write_shards(samples, out, shard_size=shard_size, image_format=image_format)  # type: ignore[arg-type]


def write_builtin(name: Literal["shapes", "digits"], out_dir: str | os.PathLike, *, num_samples: int,
                  resolution: int = 64, seed: int = 0, shard_size: int = 1000, val_fraction: float = 0.1,
                  num_val: int | None = None, image_format: Literal["jpg", "png", "webp"] = "png") -> BuiltinShards:
    """Write `out_dir/train/00000.tar...` and `out_dir/val/...`, or do nothing if a matching dataset is there.

    Args:
        num_samples: train + val samples; val takes `num_val`, else `round(num_samples * val_fraction)`.
        image_format: png keeps the palette colours exact, which the shapes checker relies on.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown builtin dataset {name!r}; valid names: {', '.join(BUILTIN_DATASETS)}")
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(PIL_FORMATS)}, got {image_format!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = num_val if num_val is not None else round(num_samples * val_fraction)
    n_train = num_samples - n_val
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need at least one train sample: num_samples={num_samples}, num_val={n_val}")
    args = {"name": name, "num_samples": num_samples, "num_val": n_val, "resolution": resolution, "seed": seed,
            "shard_size": shard_size, "image_format": image_format, "version": _FORMAT_VERSION}
    root = Path(out_dir)
    if (manifest := _is_complete(root, args)) is not None:
        return _result(root, manifest)

    _clear(root)
    kw = {"seed": seed, "resolution": resolution, "shard_size": shard_size, "image_format": image_format}
    make = BUILTIN_DATASETS[name]
    splits = {"train": _write_split(make, root / "train", range(n_train), **kw)}
    if n_val:  # val continues the index stream, so it never repeats a train image
        splits["val"] = _write_split(make, root / "val", range(n_train, n_train + n_val), **kw)
    manifest = {"args": args, "splits": {split: {"num_shards": len(s.shards), "num_samples": s.num_samples,
                                                 "counts": s.counts} for split, s in splits.items()}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last: marks the dataset complete
    return _result(root, manifest)
