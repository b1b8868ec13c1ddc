"""Start-up of the epoch-mode loader on many small shards: how long ShardLoader takes to expand and count them with
img2dataset's *_stats.json files, without them (every tar's headers scanned), and without them on a second start
(the header-scan cache, ldm.data.shards.ScanCache).

    python bench/data_startup.py [--shards 5000] [--samples-per-shard 4] [--rounds 3]

Each figure is the median over rounds of a fresh ShardLoader construction in this process (the page cache is warm
after the first round, as on a second start of a real run). Ratios are against the stats-file start-up.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from ldm.data.shards import ScanCache, stats_path
from ldm.data.webdataset import ShardLoader


def write_small_shards(root: Path, shards: int, per_shard: int) -> list[Path]:
    """`shards` tars of `per_shard` 16x16 JPEGs with captions, each with an img2dataset stats file."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    jpeg, paths = buf.getvalue(), []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                for ext, data in (("jpg", jpeg), ("txt", b"a red square")):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        stats_path(path).write_text(json.dumps({"successes": per_shard}))
        paths.append(path)
    return paths


def startup(root: Path, cache: Path | None) -> float:
    """Seconds to build an epoch-mode ShardLoader over `root` (counts for the epoch length)."""
    import os

    os.environ["LDM_SCAN_CACHE"] = str(cache) if cache else "off"
    start = time.perf_counter()
    ShardLoader(root, batch_size=8, resolution=16, num_workers=2)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=5000)
    parser.add_argument("--samples-per-shard", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "shards", Path(tmp) / "scan_cache"
        root.mkdir()
        paths = write_small_shards(root, args.shards, args.samples_per_shard)
        with_stats = statistics.median(startup(root, None) for _ in range(args.rounds))
        for path in paths:
            stats_path(path).unlink()
        scanned = statistics.median(startup(root, None) for _ in range(args.rounds))
        warm = []
        for _ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            startup(root, cache)  # the first start scans and writes the cache
            warm.append(startup(root, cache))
        cached = statistics.median(warm)
        assert ScanCache(cache).root == cache
    print(f"{args.shards} shards x {args.samples_per_shard} samples, median of {args.rounds}:")
    print(f"  stats files        {with_stats:7.3f} s")
    print(f"  header scan        {scanned:7.3f} s  ({scanned / with_stats:.2f}x the stats start-up)")
    print(f"  scan cache (warm)  {cached:7.3f} s  ({cached / with_stats:.2f}x)")


if __name__ == "__main__":
    main()
