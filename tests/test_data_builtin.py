"""Built-in datasets: shapes captions match the pixels, digits captions match sklearn's labels, determinism,
and write_builtin's train/val layout and idempotence."""

import dataclasses
import json
import re

import numpy as np
import pytest

from ldm.data.builtin import digits as digits_ds
from ldm.data.builtin import shapes as shapes_ds
from ldm.data.builtin import write_builtin
from ldm.data.webdataset import ShardLoader

CAPTION = re.compile(r"^a (small|large) (\w+) (\w+)(?: in the ([a-z ]+) corner,)? on an? (\w+) background$")


def test_constants_define_the_vocabulary():
    assert len(shapes_ds.PALETTE) == 6 and len(shapes_ds.SHAPES) >= 4
    assert set(shapes_ds.PALETTE) <= set(shapes_ds.BACKGROUNDS) and len(shapes_ds.BACKGROUNDS) > 6
    colors = list(shapes_ds.PALETTE.values())
    gaps = [np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colors) for b in colors[i + 1:]]
    assert min(gaps) > 60  # nearest-colour classification stays unambiguous


def _area(img: np.ndarray, background: str, color: str) -> float:
    """Antialiased shape area in pixels: each pixel's position between background and shape colour."""
    bg, fg = np.array(shapes_ds.BACKGROUNDS[background], float), np.array(shapes_ds.PALETTE[color], float)
    return float(np.clip((img - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0, 1).sum())


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes_caption_matches_pixels(resolution):
    seen = set()
    for index in range(120):
        sample = shapes_ds.make_sample(7, index, resolution)
        match = CAPTION.match(sample.caption)
        assert match, sample.caption
        size, color, shape, corner, background = match.groups()
        assert color in shapes_ds.PALETTE and shape in shapes_ds.SHAPES and background != color
        seen.update([("shape", shape), ("color", color), ("size", size)])
        img = np.asarray(sample.image)
        assert img.shape == (resolution, resolution, 3)
        cx, cy = sample.metadata["center"]
        centre = img[int(cy * resolution), int(cx * resolution)]
        assert shapes_ds.nearest_color(centre) == color
        assert np.abs(centre.astype(int) - shapes_ds.PALETTE[color]).max() <= 2
        for corner_px in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            assert tuple(corner_px) == shapes_ds.BACKGROUNDS[background]
        if corner is not None:  # the shape really sits in the named quadrant
            ys, xs = np.nonzero(np.abs(img.astype(int) - shapes_ds.BACKGROUNDS[background]).sum(-1) > 30)
            assert ("top" in corner) == (ys.mean() < resolution / 2)
            assert ("left" in corner) == (xs.mean() < resolution / 2)
        if size == "large":  # about 4x the area of the same shape drawn small
            spec = shapes_ds.sample_spec(7, index)
            small = np.asarray(shapes_ds.render(dataclasses.replace(spec, size="small"), resolution))

            ratio = _area(img, background, color) / _area(small, background, color)
            assert 3 < ratio < 5
    assert len(seen) == len(shapes_ds.SHAPES) + 6 + 2  # every shape, colour and size occurs


def test_shapes_and_digits_are_deterministic():
    for module in (shapes_ds, digits_ds):
        a, b = module.make_sample(3, 11, 32), module.make_sample(3, 11, 32)
        assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        different = [module.make_sample(4, i, 32).caption for i in range(20)]
        assert different != [module.make_sample(3, i, 32).caption for i in range(20)]


def test_digits_captions_match_sklearn_labels():
    from sklearn.datasets import load_digits

    ref = load_digits()
    for index in range(50):
        sample = digits_ds.make_sample(0, index, 32)
        source = sample.metadata["source_index"]
        assert sample.caption == f"a handwritten digit {digits_ds.DIGIT_NAMES[ref.target[source]]}"
        img = np.asarray(sample.image, dtype=np.float64)
        assert img.shape == (32, 32)
        small = img.reshape(8, 4, 8, 4).mean(axis=(1, 3))  # back to 8x8: the same strokes
        assert np.corrcoef(small.ravel(), ref.images[source].ravel())[0, 1] > 0.9
    sources = [digits_ds.source_index(0, i) for i in range(1797)]
    assert sorted(sources) == list(range(1797))  # one pass shows every digit once


def test_write_builtin_layout_and_idempotence(tmp_path):
    out = tmp_path / "shapes"
    result = write_builtin("shapes", out, num_samples=50, resolution=32, seed=1, shard_size=16, val_fraction=0.2)
    assert (result.num_train, result.num_val) == (40, 10)
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (out / "val" / "00000_stats.json").is_file()
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["args"]["num_samples"] == 50 and manifest["splits"]["train"]["counts"] == [16, 16, 8]
    train = ShardLoader(result.train_shards, batch_size=8, resolution=32, num_workers=0, drop_last=False)
    val = ShardLoader(result.val_shards, batch_size=8, resolution=32, num_workers=0, drop_last=False)
    train_keys = {k for b in train for k in b["key"]}
    val_keys = {k for b in val for k in b["key"]}
    assert len(train_keys) == 40 and len(val_keys) == 10 and not train_keys & val_keys

    mtime = (out / "train" / "00000.tar").stat().st_mtime_ns
    again = write_builtin("shapes", out, num_samples=50, resolution=32, seed=1, shard_size=16, val_fraction=0.2)
    assert again == result and (out / "train" / "00000.tar").stat().st_mtime_ns == mtime  # skipped
    changed = write_builtin("shapes", out, num_samples=30, resolution=32, seed=1, shard_size=16, num_val=5)
    assert changed.num_train == 25 and len(list((out / "train").glob("*.tar"))) == 2  # old shards removed
    (out / "train" / "00001.tar").unlink()  # incomplete -> rewritten
    write_builtin("shapes", out, num_samples=30, resolution=32, seed=1, shard_size=16, num_val=5)
    assert (out / "train" / "00001.tar").is_file()


def test_write_builtin_digits_and_errors(tmp_path):
    result = write_builtin("digits", tmp_path, num_samples=12, resolution=16, seed=0, num_val=0)
    assert result.val_shards is None and result.num_train == 12
    with pytest.raises(ValueError, match="valid names: shapes, digits"):
        write_builtin("cifar", tmp_path, num_samples=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train sample"):
        write_builtin("digits", tmp_path, num_samples=4, num_val=4)
