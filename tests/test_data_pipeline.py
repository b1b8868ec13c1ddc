"""The shard -> batch pipeline on one rank: batch format, every skip cause counted exactly, metadata filters,
padding, reproducibility, and real photographs surviving decode + resize."""

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from webdataset import TarWriter

from ldm.data.shards import Sample, write_shards
from ldm.data.webdataset import SKIP_CAUSES, ShardLoader, passes_filters

RES = 16


def _png(size=(24, 24), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height: a decompression bomb as far as the header goes."""
    data = bytearray(_png((1, 1)))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _record(key: str, *, image: bytes | None = None, caption: bytes | None = b"ok", meta: dict | None = None):
    rec = {"__key__": key}
    if image is not None:
        rec["png"] = image
    if caption is not None:
        rec["txt"] = caption
    rec["json"] = json.dumps(meta if meta is not None else {"aesthetic": 6.0, "width": 24}).encode()
    return rec


def _write_tar(path, records, stats: int | None = None) -> None:
    with TarWriter(str(path), encoder=False) as w:
        for rec in records:
            w.write(rec)
    if stats is not None:
        path.with_name(path.name.replace(".tar", "_stats.json")).write_text(json.dumps({"successes": stats}))


def _truncate_inside(path, member: str) -> None:
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + info.size // 2])


def _good(prefix: str, n: int):
    return [_record(f"{prefix}{i:03d}", image=_png()) for i in range(n)]


def _totals(batches) -> dict[str, int]:
    return {cause: sum(int(b["skips"][cause]) for b in batches) for cause in SKIP_CAUSES}


def _jpeg_truncated() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:600]


@pytest.fixture
def bad_dataset(tmp_path):
    """Four shards: two clean, one with one sample of every bad kind, one truncated mid-file, one not a tar."""
    _write_tar(tmp_path / "00000.tar", _good("a", 5))
    bad = [
        _record("b000", image=b"\x89PNG but not really"),  # corrupt_image
        _record("b001", image=_jpeg_truncated()),  # corrupt_image (valid header, data cut off)
        _record("b002", image=_png(), caption=None),  # bad_caption: no txt
        _record("b003", image=_png(), caption=b"\xff\xfe caf\xe9"),  # bad_caption: not UTF-8
        _record("b004", image=_png((1, 1))),  # too_small
        _record("b005", image=_png_with_header_size(20_000, 20_000)),  # too_large: PIL's own bomb error
        _record("b006", image=_png_with_header_size(3_000, 3_000)),  # too_large: our header check
        _record("b007", caption=b"only a caption"),  # missing_image
        _record("b008", image=_png(), meta={"aesthetic": 4.0}),  # filtered: below threshold
        _record("b009", image=_png(), meta={}),  # filtered: key missing
        _record("b010", image=_png(), caption=b""),  # fine: empty caption is the unconditional prompt
    ] + _good("b1", 3)
    _write_tar(tmp_path / "00001.tar", bad)
    _write_tar(tmp_path / "00002.tar", _good("c", 4) + [_record("c900", image=_png((300, 300)))])
    _truncate_inside(tmp_path / "00002.tar", "c900.png")
    (tmp_path / "00003.tar").write_bytes(b"this is not a tar file" * 40)  # bad_shard
    return tmp_path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_sample_is_skipped_and_counted(bad_dataset, num_workers):
    loader = ShardLoader(bad_dataset, batch_size=2, resolution=RES, num_workers=num_workers, drop_last=False,
                         min_side=8, max_pixels=1_000_000, metadata_filters={"aesthetic": 5.0})
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    expected_keys = {f"a{i:03d}" for i in range(5)} | {"b010", "b1000", "b1001", "b1002"}
    expected_keys |= {f"c{i:03d}" for i in range(4)}
    assert sorted(keys) == sorted(expected_keys)
    assert _totals(batches) == {"corrupt_image": 2, "missing_image": 1, "bad_caption": 2, "too_small": 1,
                                "too_large": 2, "bad_shard": 2, "empty_shard": 0, "filtered": 2, "corrupt_latent": 0,
                                "unbatched": 0, "left_out": 0, "padded_batches": 0}
    captions = dict(zip(keys, [c for b in batches for c in b["caption"]]))
    assert captions["b010"] == "" and captions["a000"] == "ok"


def test_batch_format(bad_dataset):
    batch = next(iter(ShardLoader(bad_dataset / "00000.tar", batch_size=2, resolution=RES, num_workers=0)))
    assert set(batch) == {"image", "caption", "key", "skips"}
    assert batch["image"].shape == (2, 3, RES, RES) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # (200, 30, 30) -> [-1, 1]
    assert torch.allclose(batch["image"][0, :, 4, 4], torch.tensor([200, 30, 30]) / 127.5 - 1, atol=1e-5)
    assert isinstance(batch["caption"], list) and isinstance(batch["key"], list)
    assert set(batch["skips"]) == set(SKIP_CAUSES)


def _short_shards(tmp_path):
    """Stats promise 8 + 8 samples, but 3 images in the first shard are corrupt."""
    recs = _good("a", 5) + [_record(f"a9{i}", image=b"garbage") for i in range(3)]
    _write_tar(tmp_path / "00000.tar", recs, stats=8)
    _write_tar(tmp_path / "00001.tar", _good("b", 8), stats=8)


def test_one_rank_ends_its_epoch_early_rather_than_repeat(tmp_path):
    """batches_per_rank says 4 (2 per worker at batch_size 4); the first worker fills 1 (its 5th good sample is its
    dropped partial batch): one rank stops after 3 batches, each good sample at most once, no padding."""
    _short_shards(tmp_path)
    loader = ShardLoader(tmp_path, batch_size=4, resolution=RES, num_workers=2, shuffle=False, split="shard")
    assert len(loader) == 4
    for _ in range(2):  # and again next epoch
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        assert len(batches) == 3 and len(keys) == len(set(keys)) == 12
        assert set(keys) == {f"a{i:03d}" for i in range(4)} | {f"b{i:03d}" for i in range(8)}
        totals = _totals(batches)
        assert totals["padded_batches"] == 0 and totals["corrupt_image"] == 3
        assert totals["unbatched"] == 1  # a004, the first worker's partial batch: dropped, but counted


def test_a_short_rank_of_several_pads_by_restarting_its_stream(tmp_path):
    """Two ranks must run equal epochs: rank 0 (shard 0) fills 1 of its 2 batches and repeats its stream for the
    other, counted as one padded batch."""
    _short_shards(tmp_path)
    ranks = [ShardLoader(tmp_path, batch_size=4, resolution=RES, num_workers=1, shuffle=False, rank=r,
                         world_size=2, split="shard") for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]
    short, full = (list(r) for r in ranks)
    assert len(short) == len(full) == 2 and all(len(b["key"]) == 4 for b in short + full)
    assert _totals(short)["padded_batches"] == 1 and _totals(short)["corrupt_image"] == 3
    assert short[1]["key"] == short[0]["key"] and _totals(full)["padded_batches"] == 0


def test_no_usable_sample_raises_instead_of_hanging(tmp_path):
    _write_tar(tmp_path / "00000.tar", [_record(f"x{i}", image=b"bad") for i in range(4)], stats=4)
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(ShardLoader(tmp_path, batch_size=2, resolution=RES, num_workers=0))


def test_passes_filters():
    assert passes_filters({"original_width": 300, "width": 100}, {"min_width": 256})
    assert not passes_filters({"width": 100}, {"min_width": 256})
    assert passes_filters({"height": 512, "aesthetic": 5.0}, {"min_height": 512, "aesthetic": 5.0})
    assert not passes_filters({"aesthetic": "high"}, {"aesthetic": 5.0})
    assert not passes_filters({}, {"min_height": 1})


def test_min_size_filter_reads_original_size(tmp_path):
    metas = [{"original_width": 500, "original_height": 400, "width": 24}, {"width": 24, "height": 24}]
    _write_tar(tmp_path / "00000.tar", [_record(f"k{i}", image=_png(), meta=m) for i, m in enumerate(metas)])
    batches = list(ShardLoader(tmp_path, batch_size=1, resolution=RES, num_workers=0, drop_last=False,
                               metadata_filters={"min_width": 256, "min_height": 256}))
    assert [b["key"] for b in batches] == [["k0"]] and _totals(batches)["filtered"] == 1


def test_same_seed_same_batches(tmp_path):
    rng = np.random.default_rng(0)
    photos = (Sample(f"{i:04d}", Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)), f"n{i}")
              for i in range(24))
    write_shards(photos, tmp_path, shard_size=6, image_format="png")

    def run(seed):
        loader = ShardLoader(tmp_path, batch_size=4, resolution=RES, num_workers=2, seed=seed)
        return [(b["key"], b["image"]) for b in loader]

    a, b, c = run(0), run(0), run(1)
    assert [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert [k for k, _ in a] != [k for k, _ in c]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / (np.mean((a.astype(np.float64) - b) ** 2) + 1e-12)))


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_real_photographs_keep_their_content(tmp_path, fmt):
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    photos = {n: getattr(skdata, n)() for n in names}
    write_shards((Sample(n, Image.fromarray(photos[n]), n) for n in names), tmp_path, image_format=fmt, quality=95)
    loader = ShardLoader(tmp_path, batch_size=4, resolution=64, num_workers=0, crop="center", flip=False)
    batch = next(iter(loader))
    for key, x in zip(batch["key"], batch["image"]):
        ours = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round()
        ref = Image.fromarray(photos[key])  # plain PIL: full decode, shortest side -> 64, centre crop
        w, h = ref.size
        scale = 64 / min(w, h)
        ref = ref.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        left, top = (ref.width - 64) // 2, (ref.height - 64) // 2
        ref_arr = np.asarray(ref.crop((left, top, left + 64, top + 64)))
        assert _psnr(ours, ref_arr) > 28, key
        other = next(n for n in names if n != key)  # sanity: a different photo is far away
        other_img = Image.fromarray(photos[other]).resize((64, 64), Image.Resampling.BICUBIC)
        assert _psnr(ours, np.asarray(other_img)) < 18


def test_pipe_urls_stream_and_failures_count_as_bad_shards(tmp_path):
    _write_tar(tmp_path / "00000.tar", _good("p", 4))
    urls = [f"pipe:cat {tmp_path / '00000.tar'}", f"pipe:cat {tmp_path / 'missing.tar'}"]
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardLoader(urls, batch_size=2, resolution=RES, num_workers=0)
    loader = ShardLoader(urls, batch_size=2, resolution=RES, num_workers=0, samples_per_shard=4, drop_last=False,
                         shuffle=False)
    batches = list(loader)
    assert [k for b in batches for k in b["key"]] == ["p000", "p001", "p002", "p003"]
    assert _totals(batches)["bad_shard"] == 1
