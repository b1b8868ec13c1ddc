"""Shard writing (img2dataset layout), shard-spec expansion and per-shard sample counts."""

import io
import json
import tarfile

import pytest
from PIL import Image
from webdataset import TarWriter

from ldm.data.shards import (
    Sample,
    count_shard_samples,
    encode_image,
    expand_urls,
    shard_sample_counts,
    stats_path,
    write_shards,
)


def _samples(n: int, size=(40, 30), mode="RGB"):
    for i in range(n):
        yield Sample(f"{i:06d}", Image.new(mode, size, (i % 255, 0, 0) if mode == "RGB" else 0), f"caption {i}",
                     {"index": i})


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def test_write_shards_layout_and_stats(tmp_path):
    summary = write_shards(_samples(7), tmp_path, shard_size=3, image_format="png")
    assert [p.name for p in summary.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert summary.counts == [3, 3, 1] and summary.num_samples == 7 and not summary.skipped
    for path, n in zip(summary.shards, summary.counts):
        stats = json.loads(stats_path(path).read_text())
        assert stats_path(path).name == path.name.replace(".tar", "_stats.json")
        assert stats["successes"] == n and stats["failed_to_download"] == 0
    files = _members(summary.shards[0])
    assert sorted(files) == sorted(f"{i:06d}.{ext}" for i in range(3) for ext in ("png", "txt", "json"))
    assert files["000001.txt"] == b"caption 1"
    meta = json.loads(files["000001.json"])
    assert meta["width"] == 40 and meta["height"] == 30 and meta["index"] == 1 and meta["key"] == "000001"
    assert Image.open(io.BytesIO(files["000001.png"])).getpixel((0, 0)) == (1, 0, 0)
    assert not list(tmp_path.glob("*.tmp"))


def test_write_shards_is_reproducible(tmp_path):
    a = write_shards(_samples(4), tmp_path / "a", shard_size=10)
    b = write_shards(_samples(4), tmp_path / "b", shard_size=10)
    assert a.shards[0].read_bytes() == b.shards[0].read_bytes()


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encode_formats_and_max_side(fmt):
    img = Image.new("RGBA", (400, 100), (0, 0, 255, 255))
    data, meta = encode_image(img, fmt, max_side=64, quality=90)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert decoded.size == (64, 16) and (meta["width"], meta["height"]) == (64, 16)
    assert (meta["original_width"], meta["original_height"]) == (400, 100)
    assert decoded.convert("RGB").getpixel((5, 5)) == pytest.approx((0, 0, 255), abs=8)


def test_write_shards_rejects_bad_keys_and_formats(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_shards([Sample("a.b", Image.new("RGB", (8, 8)), "x")], tmp_path)
    with pytest.raises(ValueError, match="image_format"):
        write_shards(_samples(1), tmp_path, image_format="gif")  # type: ignore[arg-type]


def test_expand_urls_patterns_dirs_lists(tmp_path):
    write_shards(_samples(6), tmp_path, shard_size=2)
    names = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "{00000..00002}.tar")) == names
    assert expand_urls(tmp_path) == names  # a directory: its *.tar, sorted
    assert expand_urls(str(tmp_path / "*.tar")) == names
    assert expand_urls([names[2], str(tmp_path / "{00000..00001}.tar")]) == [names[2], *names[:2]]
    remote = "pipe:curl -s https://example.com/{000..002}.tar"
    assert expand_urls(remote) == [f"pipe:curl -s https://example.com/{i:03d}.tar" for i in range(3)]


def test_expand_urls_errors_name_the_problem(tmp_path):
    write_shards(_samples(2), tmp_path, shard_size=1)
    with pytest.raises(FileNotFoundError, match=r"00002\.tar"):
        expand_urls(str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        (tmp_path / "empty").mkdir()
        expand_urls(tmp_path / "empty")
    with pytest.raises(ValueError, match="duplicates"):
        expand_urls([str(tmp_path / "00000.tar")] * 2)
    with pytest.raises(ValueError, match="no shards"):
        expand_urls([])


def test_counts_from_stats_scan_and_remote(tmp_path):
    summary = write_shards(_samples(5), tmp_path, shard_size=3)
    assert [count_shard_samples(str(p)) for p in summary.shards] == [3, 2]
    stats_path(summary.shards[0]).write_text(json.dumps({"successes": 17}))  # stats win over the tar
    assert count_shard_samples(str(summary.shards[0])) == 17
    stats_path(summary.shards[1]).unlink()  # no stats: scan headers, count distinct keys
    assert count_shard_samples(str(summary.shards[1])) == 2
    with TarWriter(str(tmp_path / "raw.tar"), encoder=False) as w:  # samples with 1-3 files each
        w.write({"__key__": "a", "txt": b"x"})  # a caption without an image: not a sample the loader can use
        w.write({"__key__": "b", "txt": b"x", "jpg": b"y", "json": b"{}"})
        w.write({"__key__": "c", "png": b"y"})
    assert count_shard_samples(str(tmp_path / "raw.tar")) == 2
    assert count_shard_samples("pipe:cat x.tar") is None
    with pytest.raises(ValueError, match="samples_per_shard"):
        shard_sample_counts(["https://example.com/0.tar"])
    assert shard_sample_counts(["https://example.com/0.tar"], samples_per_shard=9) == [9]


def test_scan_cache_remembers_header_scans_until_a_tar_changes(tmp_path, monkeypatch):
    from ldm.data import shards as shards_module
    from ldm.data.shards import ScanCache

    summary = write_shards(_samples(6), tmp_path / "data", shard_size=2)
    for p in summary.shards:
        stats_path(p).unlink()  # no stats: counts come from the headers
    scans = []
    real_scan = shards_module.scan_tar
    monkeypatch.setattr(shards_module, "scan_tar", lambda url: scans.append(url) or real_scan(url))
    urls = [str(p) for p in summary.shards]
    assert shard_sample_counts(urls, cache=ScanCache(tmp_path / "cache")) == [2, 2, 2] and len(scans) == 3
    assert shard_sample_counts(urls, cache=ScanCache(tmp_path / "cache")) == [2, 2, 2] and len(scans) == 3  # cached
    write_shards(_samples(1), tmp_path / "data", shard_size=1)  # 00000.tar rewritten: another size and mtime
    stats_path(summary.shards[0]).unlink()
    assert shard_sample_counts(urls, cache=ScanCache(tmp_path / "cache"))[0] == 1 and len(scans) == 4
    assert shard_sample_counts(urls, cache=ScanCache("off")) == [1, 2, 2] and len(scans) == 7  # off: always scans
    (tmp_path / "ro").write_text("a file where the cache folder should be")
    assert shard_sample_counts(urls, cache=ScanCache(tmp_path / "ro")) == [1, 2, 2]  # unwritable: still counts
