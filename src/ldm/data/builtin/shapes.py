"""Procedural images of one coloured geometric shape on a plain background, captioned with exactly what is
drawn ("a small red triangle on a blue background"); deterministic in (seed, index) at any resolution.

The module constants are the vocabulary a prompt-adherence checker can test generated images against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.shards import Sample

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {  # shape colours, far apart in RGB so the nearest one is unambiguous
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, RGB] = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128),
                               **PALETTE}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 0.32, "large": 0.64}  # bounding-circle diameter / image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre as a fraction of the image side
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges, exact colours inside the shape
_JITTER = 0.03  # centre jitter as a fraction of the side; corners stay background


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    background: str
    size: str
    position: str
    center: tuple[float, float]  # jittered centre, fraction of the image side

    @property
    def caption(self) -> str:
        where = "" if self.position == "center" else f" in the {self.position} corner,"
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"a {self.size} {self.color} {self.shape}{where} on {article} {self.background} background"


def sample_spec(seed: int, index: int) -> ShapeSpec:
    """Draw what image `index` of dataset `seed` shows; large shapes are always centred."""
    rng = np.random.default_rng([seed, index])
    color = str(rng.choice(list(PALETTE)))
    background = str(rng.choice([name for name in BACKGROUNDS if name != color]))
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS))) if size == "small" else "center"
    dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
    x, y = POSITIONS[position]
    return ShapeSpec(str(rng.choice(SHAPES)), color, background, size, position, (x + dx, y + dy))


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    start = math.radians(start_deg)
    return [(cx + r * math.cos(start + i * step), cy + r * math.sin(start + i * step))
            for i, r in enumerate(radii)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: RGB) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.8 * r  # a square of the same bounding circle looks too big next to the other shapes
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        draw.polygon(_polygon(cx, cy, [r] * 3, -90), fill=fill)
    elif shape == "star":  # five points; inner radius wide enough to stay solid at 32 px
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, -90), fill=fill)
    elif shape == "cross":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def render(spec: ShapeSpec, resolution: int) -> Image.Image:
    """Draw `spec` as an RGB image of side `resolution`."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    cx, cy = spec.center[0] * side, spec.center[1] * side
    draw_shape(ImageDraw.Draw(img), spec.shape, cx, cy, SIZES[spec.size] * side / 2, PALETTE[spec.color])
    return img.reduce(SUPERSAMPLE)  # box filter: each output pixel is the mean of a 4x4 block


def make_sample(seed: int, index: int, resolution: int) -> Sample:
    spec = sample_spec(seed, index)
    return Sample(f"{index:09d}", render(spec, resolution), spec.caption, asdict(spec))


def iter_samples(num_samples: int, *, seed: int, resolution: int, start: int = 0) -> Iterator[Sample]:
    for index in range(start, start + num_samples):
        yield make_sample(seed, index, resolution)


def nearest_color(rgb: tuple[float, float, float], colors: dict[str, RGB] = PALETTE) -> str:
    """Name of the colour in `colors` closest to `rgb` (Euclidean in RGB)."""
    target = [float(c) for c in rgb[:3]]  # floats: uint8 pixel values would wrap around when subtracted
    return min(colors, key=lambda name: sum((a - b) ** 2 for a, b in zip(colors[name], target)))
