"""Image preprocessing for training: bytes -> PIL (header checks, JPEG draft decoding) -> RGB -> square crop
at the target resolution -> float tensor in [-1, 1]."""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.data.buckets import cover_box, nearest_bucket

WHITE = (255, 255, 255)


class SkipSample(Exception):
    """A sample that cannot be used; `cause` names the skip counter it belongs to."""

    def __init__(self, cause: str, detail: str = ""):
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause


# ----------------------------------------------------------------------------------------------------------
# Mode conversion


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own I;16 -> L conversion clips at 255 instead of rescaling, which turns most images white.
    arr = np.asarray(img)
    if img.mode == "F":  # float images follow L's 0..255 scale in PIL
        arr8 = np.clip(arr, 0, 255).round()
    else:  # I, I;16*: treated as 16-bit samples
        arr8 = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(arr8.round().astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB; transparency (alpha, palette or tRNS) is composited on `background`."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        if img.mode == "La":  # premultiplied; PIL converts it only to LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Decoding with size checks


def open_image(data: bytes, *, min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """Read only the header of `data` and check its size; raises SkipSample(corrupt_image|too_small|too_large)."""
    try:
        # We check the pixel count ourselves; PIL's warning would be noise and its error is remapped below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", str(e)) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # UnidentifiedImageError is an OSError
        raise SkipSample("corrupt_image", str(e)) from e
    w, h = img.size
    if min(w, h) < max(min_side, 1):
        raise SkipSample("too_small", f"{w}x{h} < {min_side}")
    if max_pixels is not None and w * h > max_pixels:
        raise SkipSample("too_large", f"{w}x{h} > {max_pixels} pixels")
    return img


def decode_image(data: bytes, *, draft_size: int | Callable[[tuple[int, int]], tuple[int, int]] | None = None,
                 min_side: int = 1, max_pixels: int | None = None) -> Image.Image:
    """Decode `data` to RGB; JPEGs are decoded at the smallest DCT scale whose sides stay >= `draft_size` (a side,
    or a function of the header's (w, h) giving the (w, h) needed)."""
    img = open_image(data, min_side=min_side, max_pixels=max_pixels)
    if draft_size is not None and img.format == "JPEG":
        # Decoding at 1/2, 1/4 or 1/8 scale skips most of the IDCT work and the resize that would follow.
        img.draft("RGB", draft_size(img.size) if callable(draft_size) else (draft_size, draft_size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        return to_rgb(img)
    except Image.DecompressionBombError as e:  # e.g. a GIF frame larger than its header claims
        raise SkipSample("too_large", str(e)) from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise SkipSample("corrupt_image", str(e)) from e


# ----------------------------------------------------------------------------------------------------------
# Geometry and tensor conversion


def square_box(size: tuple[int, int], crop: Literal["center", "random"],
               rng: random.Random | None = None) -> tuple[float, float, float, float]:
    """The largest square inside an image of `size`, centred or at a random offset drawn from `rng`."""
    side = min(size)
    return cover_box(*size, (side, side), crop, rng)


def to_uint8(img: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 pixels -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    return to_unit_range(to_uint8(img))


@dataclass
class ImageTransform:
    """Resize the shortest side to `resolution`, crop a square (center or random) and optionally flip; with
    `buckets` ((h, w) sizes, ldm.data.buckets), resize to cover the bucket nearest the image's aspect ratio and crop
    the least instead."""

    resolution: int
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    buckets: Sequence[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        self.buckets = [(int(h), int(w)) for h, w in self.buckets] if self.buckets else None

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) an image of `size` = (w, h) is trained at."""
        return nearest_bucket(*size, self.buckets) if self.buckets else (self.resolution, self.resolution)

    def _draft(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (w, h) a decoded image needs so that its crop still covers its target."""
        (bh, bw), (w, h) = self.target(size), size
        scale = max(bw / w, bh / h)
        return math.ceil(w * scale), math.ceil(h * scale)

    def resize_crop(self, img: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """RGB image -> RGB image of its target size (resolution x resolution without buckets)."""
        height, width = self.target(img.size)
        box = cover_box(*img.size, (height, width), self.crop, rng) if self.buckets else square_box(
            img.size, self.crop, rng)
        # Cropping through resize(box=...) resamples only the pixels we keep: same result as resize-then-crop
        # up to sub-pixel alignment, without resizing the discarded strip.
        out = img.resize((width, height), Image.Resampling.BICUBIC, box=box)
        if self.flip:
            if rng is None:
                raise ValueError("flip=True needs a seeded random.Random")
            if rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> Tensor:
        return to_tensor(self.resize_crop(to_rgb(img), rng))  # (3, R, R)

    def decode_uint8(self, data: bytes, rng: random.Random | None = None, *, min_side: int = 1,
                     max_pixels: int | None = None) -> Tensor:
        """Encoded image bytes -> uint8 (3, H, W) of its target size; raises SkipSample on unusable images."""
        img = decode_image(data, draft_size=self._draft if self.buckets else self.resolution, min_side=min_side,
                           max_pixels=max_pixels)
        try:
            return to_uint8(self.resize_crop(img, rng))
        except OSError as e:  # lazily decoded formats can still fail while resampling
            raise SkipSample("corrupt_image", str(e)) from e

    def decode(self, data: bytes, rng: random.Random | None = None, *, min_side: int = 1,
               max_pixels: int | None = None) -> Tensor:
        """Encoded image bytes -> float (3, R, R) in [-1, 1]; raises SkipSample on unusable images."""
        return to_unit_range(self.decode_uint8(data, rng, min_side=min_side, max_pixels=max_pixels))
