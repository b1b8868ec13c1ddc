"""Mode conversion, decoding checks and resize/crop of ldm.data.transforms."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.transforms import ImageTransform, SkipSample, decode_image, open_image, to_rgb, to_tensor


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(img: Image.Image) -> tuple[int, int, int]:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel((0, 0))


@pytest.mark.parametrize(("img", "expected"), [
    (Image.new("RGB", (3, 2), (10, 20, 30)), (10, 20, 30)),
    (Image.new("L", (3, 2), 77), (77, 77, 77)),
    (Image.new("1", (3, 2), 1), (255, 255, 255)),
    (Image.new("1", (3, 2), 0), (0, 0, 0)),
    (Image.new("CMYK", (3, 2), (0, 255, 255, 0)), (255, 0, 0)),
    (Image.new("CMYK", (3, 2), (0, 0, 0, 255)), (0, 0, 0)),
    (Image.new("YCbCr", (3, 2), (128, 128, 128)), (128, 128, 128)),
    (Image.new("I;16", (3, 2), 65535), (255, 255, 255)),
    (Image.new("I;16", (3, 2), 32896), (128, 128, 128)),  # 128 * 257: rescaled, not clipped
    (Image.new("I", (3, 2), 257 * 40), (40, 40, 40)),
    (Image.new("F", (3, 2), 99.6), (100, 100, 100)),
    # Alpha is composited on white: c * a + 255 * (1 - a).
    (Image.new("RGBA", (3, 2), (200, 0, 100, 255)), (200, 0, 100)),
    (Image.new("RGBA", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
    (Image.new("RGBA", (3, 2), (0, 0, 0, 128)), (127, 127, 127)),
    (Image.new("LA", (3, 2), (0, 51)), (204, 204, 204)),
])
def test_to_rgb_values(img, expected):
    assert _rgb(img) == pytest.approx(expected, abs=1)


def test_palette_modes_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _rgb(pal) == (10, 200, 30)
    pal.info["transparency"] = 1  # palette index 1 fully transparent -> background
    assert _rgb(pal) == (255, 255, 255)
    # Through a real PNG round trip (tRNS chunk) as well.
    reread = Image.open(io.BytesIO(_encode(pal)))
    assert reread.mode == "P" and _rgb(reread) == (255, 255, 255)
    pa = Image.new("PA", (2, 2), (1, 255))
    pa.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert _rgb(pa) == (10, 200, 30)


def test_sixteen_bit_png_and_cmyk_jpeg_round_trip():
    gray16 = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    decoded = decode_image(_encode(gray16))
    assert decoded.mode == "RGB" and decoded.getpixel((1, 1)) == pytest.approx((127, 127, 127), abs=1)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    assert decode_image(_encode(cmyk, "JPEG", quality=95)).getpixel((8, 8)) == pytest.approx((255, 0, 0), abs=6)


def test_open_image_classifies_bad_bytes():
    good = _encode(Image.new("RGB", (20, 10)))
    assert open_image(good, min_side=10).size == (20, 10)
    with pytest.raises(SkipSample) as e:
        open_image(b"definitely not an image")
    assert e.value.cause == "corrupt_image"
    with pytest.raises(SkipSample) as e:
        open_image(good, min_side=11)
    assert e.value.cause == "too_small"
    with pytest.raises(SkipSample) as e:
        open_image(good, max_pixels=199)
    assert e.value.cause == "too_large"
    jpeg = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(SkipSample) as e:  # header fine, pixel data cut off
        decode_image(jpeg[: len(jpeg) // 2])
    assert e.value.cause == "corrupt_image"


def test_transform_shape_range_and_center_crop():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 20:60] = 255  # the central square is white, the side strips black
    x = ImageTransform(16, "center", flip=False)(Image.fromarray(arr))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, :, 2:-2], torch.ones(3, 16, 12), atol=1e-6)
    assert torch.equal(to_tensor(Image.new("RGB", (2, 2), (0, 255, 0)))[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_random_crop_and_flip_come_from_the_given_generator():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8))
    t = ImageTransform(16, "random", flip=True)

    def run(seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        return torch.stack([t(img, rng) for _ in range(6)])

    first = run(1)
    assert not all(torch.equal(first[0], x) for x in first[1:])  # crops and flips vary along the stream
    assert not torch.equal(first, run(2))
    random.seed(123)  # global state must not matter
    torch.manual_seed(123)
    assert torch.equal(run(1), first)
    with pytest.raises(ValueError, match="random.Random"):
        t(img, None)
    with pytest.raises(ValueError, match="center"):
        ImageTransform(16, "middle")  # type: ignore[arg-type]


def test_draft_decoding_matches_full_decode():
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (12, 18, 3), dtype=np.uint8)).resize((600, 400),
                                                                                         Image.Resampling.BICUBIC)
    data = _encode(smooth, "JPEG", quality=95)
    draft = decode_image(data, draft_size=64)
    assert min(draft.size) >= 64 and draft.size[0] < 600  # decoded at reduced scale, never below the target
    t = ImageTransform(64, "center")
    ours = t.decode(data).numpy()
    ref = t(Image.open(io.BytesIO(data))).numpy()
    mse = np.mean(((ours - ref) * 127.5) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35
