"""The shapes prompt-adherence checker: exact on clean renders, robust to blur and noise, near chance on
mismatched captions, and a caption parser that inverts `ShapeSpec.caption`."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm.data.builtin import shapes
from ldm.data.builtin.shapes_check import CHANCE, classify, parse_caption, score


def renders(resolution: int, *, blur: float = 0.0, noise: float = 0.0, seeds=(0, 1), n: int = 300):
    """(uint8 (H, W, 3) images, captions) for `n` specs of each seed, optionally blurred then noised."""
    rng = np.random.default_rng(123)
    images, captions = [], []
    for seed, index in itertools.product(seeds, range(n)):
        spec = shapes.sample_spec(seed, index)
        image = shapes.render(spec, resolution)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        x = np.asarray(image, dtype=np.float64) + rng.normal(0.0, noise, (resolution, resolution, 3))
        images.append(np.clip(x, 0, 255).round().astype(np.uint8))
        captions.append(spec.caption)
    return images, captions


@pytest.mark.parametrize("resolution", [32, 64])
def test_clean_renders_are_read_back(resolution):
    scores = score(*renders(resolution))
    # Measured: every attribute 100% on these 600 images at both resolutions.
    assert scores.accuracy("color") == 1.0 and scores.accuracy("background") == 1.0, scores
    assert scores.accuracy("shape") >= 0.99, scores.confusion["shape"]
    assert scores.accuracy("size") >= 0.99 and scores.accuracy("position") >= 0.99, scores


@pytest.mark.parametrize(("blur", "noise", "min_shape"), [
    (1.0, 0.0, 0.97),  # measured 100%
    (0.0, 10.0, 0.97),  # measured 100%
    (1.0, 10.0, 0.96),  # measured 99.2%: a few small stars read as circles or squares
])
def test_robust_to_blur_and_noise_at_32px(blur, noise, min_shape):
    scores = score(*renders(32, blur=blur, noise=noise))
    assert scores.accuracy("color") >= 0.99 and scores.accuracy("background") >= 0.99, scores
    assert scores.accuracy("shape") >= min_shape, scores.confusion["shape"]
    assert scores.accuracy("size") >= 0.98, scores


def test_mismatched_captions_score_near_chance():
    images, captions = renders(32)
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    scores = score(images, shuffled)
    for attr in ("color", "shape", "background"):  # chance: 16.7%, 20%, 12.5%
        assert scores.accuracy(attr) < CHANCE[attr] + 0.12, (attr, scores)
    assert scores.all_correct < 0.05


def test_parse_caption_inverts_every_caption():
    combos = itertools.product(shapes.SHAPES, shapes.PALETTE, shapes.BACKGROUNDS,
                               [("large", "center")] + [("small", p) for p in shapes.POSITIONS])
    for shape, color, background, (size, position) in combos:
        spec = shapes.ShapeSpec(shape, color, background, size, position, shapes.POSITIONS[position])
        assert parse_caption(spec.caption) == spec
    for index in range(50):  # sampled specs carry a jittered centre; the parser returns the nominal one
        spec = shapes.sample_spec(5, index)
        assert parse_caption(spec.caption) == dataclasses.replace(spec, center=shapes.POSITIONS[spec.position])


@pytest.mark.parametrize("caption", [
    "", "a photo of a cat", "a small pink circle on a white background", "a small red hexagon on a white background",
    "a huge red circle on a white background", "a small red circle in the middle left corner, on a white background",
    "a small red circle on a white background with a dog", "a small red circle on a navy background",
])
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


def test_accepts_pil_uint8_and_tensor_inputs():
    images, captions = renders(32, seeds=(3,), n=20)
    batch = torch.stack([torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in images])
    for array, tensor in zip(images, batch):
        expected = classify(array)
        for other in (classify(Image.fromarray(array)), classify(tensor)):
            assert dataclasses.replace(other, iou=0.0) == dataclasses.replace(expected, iou=0.0)
            assert other.iou == pytest.approx(expected.iou, abs=1e-4)
    assert score(batch, captions).correct == score(images, captions).correct
    with pytest.raises(ValueError, match="3, H, W"):
        classify(batch)
    with pytest.raises(ValueError, match="2 captions"):
        score(images, captions[:2])


def test_blank_image_has_no_shape_and_report_reads_well():
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert classify(blank).shape == "none" and classify(blank).background == "gray"
    line = str(score([blank], ["a large red circle on a gray background"]))
    assert line.startswith("colour 0.0% (chance 16.7%) · shape 0.0% (chance 20.0%) · background 100.0%")
    assert line.endswith("n=1")
