"""Images/s of ShardLoader (tar read, JPEG decode, resize, crop, batch) at 256 px with 0, 1 and 2 workers,
against the single-core bound of plain PIL decode + resize (no draft) of the same JPEGs in this process.

    python bench/data_throughput.py [--samples 384] [--rounds 3]
    python bench/data_throughput.py --buckets     # aspect-ratio buckets vs square crops, same loader, 0 workers

Ratio = loader images/s / (max(1, workers) x bound); the contenders alternate within each round and the
median over rounds is reported. Other processes on the machine skew wall-clock ratios (2 workers need 2 idle
cores), so CPU efficiency (images per CPU-second, workers included, vs the bound's) is printed as well.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from ldm.data.buckets import make_buckets
from ldm.data.shards import Sample, write_shards
from ldm.data.webdataset import ShardLoader

RESOLUTION = 256
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field"]


def _photos() -> list[Image.Image]:
    images = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]
    return images + [Image.fromarray(img) for img in load_sample_images().images]


def make_jpegs(n: int, seed: int = 0) -> list[Sample]:
    """Varied ~500-800 px JPEG-able crops of packaged photos, upscaled where the source is smaller."""
    rng = np.random.default_rng(seed)
    photos, samples = _photos(), []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = int(rng.integers(500, 801)), int(rng.integers(500, 801))
        scale = max(w / src.width, h / src.height, 1.0)
        big = src.resize((round(src.width * scale), round(src.height * scale)), Image.Resampling.BICUBIC)
        left, top = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        samples.append(Sample(f"{i:06d}", big.crop((left, top, left + w, top + h)), f"photo {i}"))
    return samples


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pil_bound(jpegs: list[bytes]) -> tuple[float, float]:
    """(images/s, images per CPU-second) of full decode + shortest-side bicubic resize + centre crop."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        s = RESOLUTION / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        left, top = (img.width - RESOLUTION) // 2, (img.height - RESOLUTION) // 2
        img.crop((left, top, left + RESOLUTION, top + RESOLUTION)).load()
    return len(jpegs) / (time.perf_counter() - start), len(jpegs) / (_cpu_seconds() - cpu)


def loader_rate(shards: Path, num_workers: int, buckets: list[tuple[int, int]] | None = None) -> tuple[float, float]:
    """(images/s, images per CPU-second of main + workers) over one full epoch, worker start-up included."""
    loader = ShardLoader(shards, batch_size=32, resolution=RESOLUTION, num_workers=num_workers, seed=0,
                         buckets=buckets)
    start, cpu, images = time.perf_counter(), _cpu_seconds(), 0
    for batch in loader:
        images += batch["image"].shape[0]
    wall = time.perf_counter() - start
    gc.collect()  # make sure the epoch's workers are joined, so their CPU time is counted
    return images / wall, images / (_cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--buckets", action="store_true", help="buckets vs square crops (0 workers, alternating)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the bound is single-core; keep the main process honest too

    with tempfile.TemporaryDirectory() as tmp:
        summary = write_shards(make_jpegs(args.samples), tmp, shard_size=args.samples // 8, quality=90)
        jpegs = []
        for shard in summary.shards:
            with tarfile.open(shard) as tf:
                jpegs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
        sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
        print(f"{len(jpegs)} JPEGs, {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
              f"{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB mean, target {RESOLUTION} px")

        if args.buckets:
            return compare_buckets(Path(tmp), args.rounds)
        results: dict[str, list[tuple[float, float]]] = {"bound": [], "w0": [], "w1": [], "w2": []}
        for _ in range(args.rounds):
            results["bound"].append(pil_bound(jpegs))
            for workers in (0, 1, 2):
                results[f"w{workers}"].append(loader_rate(Path(tmp), workers))

    def median(key: str, i: int) -> float:
        return statistics.median(r[i] for r in results[key])

    bound, bound_cpu = median("bound", 0), median("bound", 1)
    print(f"\nplain PIL decode+resize (no draft), 1 core: {bound:7.1f} img/s, {bound_cpu:.1f} img/CPU-s "
          f"(median of {args.rounds}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'workers':>8} {'img/s':>9} {'bound':>9} {'ratio':>7} {'img/CPU-s':>10} {'cpu-eff':>8}")
    for workers in (0, 1, 2):
        rate, cpu_rate = median(f"w{workers}", 0), median(f"w{workers}", 1)
        reference = max(1, workers) * bound
        print(f"{workers:>8} {rate:9.1f} {reference:9.1f} {rate / reference:7.2f} {cpu_rate:10.1f} "
              f"{cpu_rate / bound_cpu:8.2f}")


def compare_buckets(shards: Path, rounds: int) -> None:
    """Images/s with make_buckets(256, 64) against square crops, alternating within each round, in this process.
    Buckets take the whole epoch's full batches only (a worker's partial bucket batches are left out), so the rate
    counts delivered images per second."""
    buckets = make_buckets(RESOLUTION, 64)
    rates: dict[str, list[float]] = {"square": [], "buckets": []}
    for _ in range(rounds):
        rates["square"].append(loader_rate(shards, 0)[0])
        rates["buckets"].append(loader_rate(shards, 0, buckets)[0])
    square, bucketed = statistics.median(rates["square"]), statistics.median(rates["buckets"])
    print(f"\nsquare crops {square:.1f} img/s, buckets {buckets} {bucketed:.1f} img/s: ratio {bucketed / square:.2f} "
          f"(median of {rounds}, 0 workers)")


if __name__ == "__main__":
    main()
