"""Aspect-ratio buckets (NovelAI 2022, SDXL Sec. 2.3): a fixed set of training sizes (h, w) of about the same pixel
area, sides multiples of what the autoencoder and backbone need. Each image goes to the bucket nearest its aspect
ratio, is resized to cover it and cropped by the least (instead of a centre square that cuts off heads), and a batch
holds one bucket."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

Size = tuple[int, int]  # (height, width) in pixels


def make_buckets(resolution: int, multiple: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Sizes of area at most resolution^2 and as close to it as the `multiple` allows, aspect ratios up to `max_ratio`
    either way, sorted from tallest to widest; (resolution, resolution) is one of them when `multiple` divides it.
    E.g. 256 px, multiple 64: 128x448 ... 256x256 ... 448x128 (heights x widths)."""
    if resolution < multiple or multiple < 1 or max_ratio < 1:
        raise ValueError(f"need resolution >= multiple >= 1 and max_ratio >= 1, got {resolution=}, {multiple=}, "
                         f"{max_ratio=}")
    area, sizes = resolution * resolution, set()
    for side in range(multiple, int(resolution * math.sqrt(max_ratio)) + multiple, multiple):
        other = (area // side) // multiple * multiple  # the largest multiple that keeps the area within budget
        if other >= multiple and max(side, other) / min(side, other) <= max_ratio:
            sizes |= {(side, other), (other, side)}
    return sorted(sizes, key=lambda s: s[1] / s[0])


def check_buckets(buckets: Sequence[Sequence[int]], multiple: int) -> list[Size]:
    """Buckets as (h, w) tuples, each side a positive multiple of `multiple` (the autoencoder's factor times the
    backbone's size multiple), else a ValueError naming the first bad one."""
    sizes = [(int(b[0]), int(b[1])) for b in buckets]
    if not sizes:
        raise ValueError("buckets must hold at least one (height, width)")
    bad = next((s for s in sizes if min(s) < 1 or s[0] % multiple or s[1] % multiple), None)
    if bad is not None:
        raise ValueError(f"bucket {bad[0]}x{bad[1]}: both sides must be multiples of {multiple} (autoencoder factor "
                         "x backbone size multiple)")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"buckets are listed twice: {sizes}")
    return sizes


def resolve_buckets(buckets: bool | Sequence[Sequence[int]] | None, resolution: int, multiple: int,
                    max_ratio: float) -> list[Size] | None:
    """The config's `buckets`: True makes them (make_buckets), a list gives (h, w) sizes (checked), False/None: off."""
    if buckets is True:
        return make_buckets(resolution, multiple, max_ratio)
    if not buckets:
        return None
    return check_buckets(buckets, multiple)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's, in log ratio (so 2:1 and 1:2 are equally far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def cover_box(width: int, height: int, bucket: Size, crop: Literal["center", "random"],
              rng: random.Random | None = None) -> tuple[float, float, float, float]:
    """The region of a (width x height) image that, resized to the bucket, covers it exactly: the bucket's aspect
    ratio, as large as fits (so the least is cropped), centred or at a random offset."""
    bh, bw = bucket
    scale = max(bw / width, bh / height)  # resize factor that makes the image cover the bucket
    cw, ch = min(width, bw / scale), min(height, bh / scale)
    if crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs a seeded random.Random")
        left, top = _offset(rng, width - cw), _offset(rng, height - ch)
    elif crop == "center":
        # Fractional offsets keep the crop centred exactly, also on a draft-decoded (1/8 scale) image.
        left, top = (width - cw) / 2, (height - ch) / 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return left, top, left + cw, top + ch


def _offset(rng: random.Random, slack: float) -> float:
    """A random crop offset in [0, slack]: whole pixels when the slack is whole (a square crop), else any."""
    return rng.randint(0, int(slack)) if float(slack).is_integer() else rng.uniform(0, slack)


def kept_fraction(width: int, height: int, bucket: Size) -> float:
    """The fraction of an image's pixels inside its crop for `bucket`."""
    left, top, right, bottom = cover_box(width, height, bucket, "center")
    return (right - left) * (bottom - top) / (width * height)
