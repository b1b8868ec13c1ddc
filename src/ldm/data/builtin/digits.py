"""scikit-learn's 8x8 handwritten digits (`load_digits`, 1,797 images) upsampled with bicubic filtering to any
resolution, white ink on black as in the source, captioned "a handwritten digit seven"."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

from ldm.data.shards import Sample

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) in 0..255, labels int (N,)); sklearn stores ink as 0..16."""
    from sklearn.datasets import load_digits  # imported lazily: sklearn adds ~1 s to start-up

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def source_index(seed: int, index: int) -> int:
    """Which sklearn digit sample `index` shows: a seeded permutation, a fresh one for every pass over 1,797."""
    n = len(load()[1])
    perm = np.random.default_rng([seed, index // n]).permutation(n)
    return int(perm[index % n])


def caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def render(source: int, resolution: int) -> Image.Image:
    images, _ = load()
    return Image.fromarray(images[source], mode="L").resize((resolution, resolution), Image.Resampling.BICUBIC)


def make_sample(seed: int, index: int, resolution: int) -> Sample:
    source = source_index(seed, index)
    label = int(load()[1][source])
    metadata = {"label": label, "source_index": source}
    return Sample(f"{index:09d}", render(source, resolution), caption(label), metadata)


def iter_samples(num_samples: int, *, seed: int, resolution: int, start: int = 0) -> Iterator[Sample]:
    for index in range(start, start + num_samples):
        yield make_sample(seed, index, resolution)
