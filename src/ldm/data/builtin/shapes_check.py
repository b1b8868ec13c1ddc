"""A deterministic prompt-adherence checker for the built-in `shapes` dataset: parse a caption, read colour,
background, shape, size and position back from pixels, and score a batch of samples against their prompts.

Shapes are recognised by template matching: the foreground is fitted with every shape drawn by the dataset's own
`draw_shape` at the foreground's centroid and area, and the best soft IoU wins.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ldm.data.builtin import shapes
from ldm.data.builtin.shapes import BACKGROUNDS, PALETTE, POSITIONS, SHAPES, SIZES, ShapeSpec, nearest_color

ImageLike = Image.Image | np.ndarray | Tensor
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "background", "size", "position")
MIN_CONTRAST = 30.0  # RGB distance from the background: an image with no pixel farther counts as blank
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)  # Gaussian sigmas in pixels; samples come out blurry
DENOISE = 0.5  # sigma in pixels of the blur applied to the coverage map (and so to every template) against noise
_CAPTION = re.compile(r"a (\w+) (\w+) (\w+)(?: in the (\w+ \w+) corner,)? on an? (\w+) background")


# ----------------------------------------------------------------------------------------------------------------
# Captions

def parse_caption(caption: str) -> ShapeSpec:
    """Invert `ShapeSpec.caption`; `center` is the nominal (unjittered) centre of the named position."""
    match = _CAPTION.fullmatch(" ".join(caption.strip().lower().split()))
    if match is None:
        raise ValueError(f"caption {caption!r} is not a shapes caption; expected e.g. "
                         "'a small red triangle in the top left corner, on a blue background'")
    size, color, shape, position, background = match.groups()
    position = position or "center"
    for kind, word, valid in (("size", size, SIZES), ("colour", color, PALETTE), ("shape", shape, SHAPES),
                              ("position", position, POSITIONS), ("background", background, BACKGROUNDS)):
        if word not in valid:
            raise ValueError(f"unknown {kind} {word!r} in caption {caption!r}; valid: {', '.join(valid)}")
    return ShapeSpec(shape, color, background, size, position, POSITIONS[position])


# ----------------------------------------------------------------------------------------------------------------
# One image

@dataclass(frozen=True)
class Classification:
    shape: str  # "none" when nothing stands out from the background
    color: str
    background: str
    size: str
    position: str
    iou: float  # soft IoU of the best shape template: how shape-like the foreground is, in [0, 1]


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """PIL image (any mode), uint8 (H, W, 3) array, or float (3, H, W) tensor in [-1, 1] -> float64 (H, W, 3)
    in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor in [-1, 1], got shape {tuple(image.shape)}")
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array in 0..255, got shape {array.shape}")
    return array


def _template(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` drawn as the dataset draws it; centre and radius in pixels."""
    s = shapes.SUPERSAMPLE
    img = Image.new("RGB", (width * s, height * s))
    shapes.draw_shape(ImageDraw.Draw(img), shape, cx * s, cy * s, r * s, (255, 255, 255))
    return np.asarray(img.reduce(s), dtype=np.float64)[..., 0] / 255.0


@cache
def _area_per_r2(shape: str) -> float:
    """Area / r^2 of each shape at bounding-circle radius r (circle pi, square 2.56, ...), measured not derived."""
    return float(_template(shape, 128.0, 128.0, 100.0, 256, 256).sum()) / 100.0**2


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    k = np.arange(n)
    m = np.exp(-0.5 * ((k[:, None] - k[None, :]) / sigma) ** 2)
    return m / m.sum(axis=1, keepdims=True)  # rows sum to 1: replicates the border rather than darkening it


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (H, W) array."""
    if sigma == 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def _sharpen(alpha: np.ndarray) -> np.ndarray:
    # Ramp over 0.25..0.75: keeps an edge's area (symmetric about 0.5) but zeroes background noise, which would
    # otherwise add up to more than a small shape's area over the whole image.
    return np.clip(2.0 * alpha - 0.5, 0.0, 1.0)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-8))


def classify(image: ImageLike) -> Classification:
    """Read background, shape colour, shape, size and position from one image (see `to_rgb_array` for inputs).

    Background: median of the border pixels. Shape colour: median of the pixels at least 70% as far from the
    background as the farthest one. Shape: best soft IoU between the foreground coverage and each template drawn
    at its centroid, scaled to its area, sharp or blurred. Size and position: nearest to the fitted radius and
    the centroid.
    """
    x = to_rgb_array(image)  # (H, W, 3)
    height, width, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = nearest_color(tuple(bg), BACKGROUNDS)

    dist = np.linalg.norm(x - bg, axis=-1)  # (H, W)
    if dist.max() < MIN_CONTRAST:
        return Classification("none", "none", background, "none", "none", 0.0)
    fg = np.median(x[dist >= 0.7 * dist.max()], axis=0)
    candidates = {name: rgb for name, rgb in PALETTE.items() if name != background}  # never drawn on itself
    color = nearest_color(tuple(fg), candidates)

    # Each pixel's coverage: its position on the segment from the background to the shape colour.
    direction = fg - bg
    alpha = np.clip((x - bg) @ direction / (direction @ direction), 0.0, 1.0)
    alpha = _sharpen(_blur(alpha, DENOISE))
    area = alpha.sum()
    if area < 1.0:
        return Classification("none", color, background, "none", "none", 0.0)
    ys, xs = np.mgrid[:height, :width] + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)

    fits = {}
    for shape in SHAPES:
        r = math.sqrt(area / _area_per_r2(shape))
        template = _template(shape, cx, cy, r, height, width)
        iou = max(_soft_iou(alpha, _sharpen(_blur(template, math.hypot(sigma, DENOISE))))
                  for sigma in TEMPLATE_BLURS)
        fits[shape] = (iou, r)
    shape = max(fits, key=lambda name: fits[name][0])
    iou, r = fits[shape]
    diameter = 2 * r / math.sqrt(height * width)
    size = min(SIZES, key=lambda name: abs(math.log(diameter / SIZES[name])))
    centre = (cx / width, cy / height)
    position = min(POSITIONS, key=lambda name: math.dist(POSITIONS[name], centre))
    return Classification(shape, color, background, size, position, iou)


# ----------------------------------------------------------------------------------------------------------------
# A batch

CHANCE: dict[str, float] = {  # accuracy of guessing uniformly, as `sample_spec` draws each attribute
    "color": 1 / len(PALETTE), "shape": 1 / len(SHAPES), "background": 1 / (len(BACKGROUNDS) - 1),
    "size": 1 / len(SIZES),
}


@dataclass
class AdherenceScores:
    n: int
    correct: Counter[str] = field(default_factory=Counter)  # attribute -> images that match the prompt
    confusion: dict[str, Counter[tuple[str, str]]] = field(default_factory=dict)  # attr -> (prompt, seen) -> n

    def accuracy(self, attribute: str) -> float:
        return self.correct[attribute] / self.n if self.n else float("nan")

    @property
    def all_correct(self) -> float:
        """Fraction of images with colour, shape and background all right."""
        return self.accuracy("all")

    def __str__(self) -> str:
        names = {"color": "colour", "shape": "shape", "background": "background", "size": "size"}
        parts = [f"{label} {100 * self.accuracy(attr):.1f}% (chance {100 * CHANCE[attr]:.1f}%)"
                 for attr, label in names.items()]
        return " · ".join([*parts, f"all three {100 * self.all_correct:.1f}%", f"n={self.n}"])


def score(images: Sequence[ImageLike] | Tensor, captions: Sequence[str]) -> AdherenceScores:
    """Classify each image and compare it with its caption; `images` may also be a (B, 3, H, W) [-1, 1] batch."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    scores = AdherenceScores(len(captions), confusion={attr: Counter() for attr in ATTRIBUTES})
    for image, caption in zip(images, captions):
        want, seen = parse_caption(caption), classify(image)
        for attr in ATTRIBUTES:
            pair = (getattr(want, attr), getattr(seen, attr))
            scores.confusion[attr][pair] += 1
            scores.correct[attr] += pair[0] == pair[1]
        scores.correct["all"] += all(getattr(want, a) == getattr(seen, a) for a in ("color", "shape", "background"))
    return scores


def prompt_set() -> list[str]:
    """60 captions naming every colour x shape pair twice (one large centred, one small in a corner) on
    backgrounds that cycle through the other colours: the quickstart's adherence prompts."""
    prompts, backgrounds, corners = [], list(BACKGROUNDS), [p for p in POSITIONS if p != "center"]
    for i, (color, shape) in enumerate((c, s) for c in PALETTE for s in SHAPES):
        background = [b for b in backgrounds if b != color][i % (len(backgrounds) - 1)]
        for size, position in (("large", "center"), ("small", corners[i % len(corners)])):
            spec = ShapeSpec(shape, color, background, size, position, POSITIONS[position])
            prompts.append(spec.caption)
    return prompts
