"""WebDataset shards in the img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`, and a
`NNNNN_stats.json` beside each `NNNNN.tar`): writing them, expanding shard specs, and per-shard sample counts."""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import braceexpand
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from ldm.data.transforms import to_rgb

ImageFormat = Literal["jpg", "png", "webp"]
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://", "sftp://", "scp://")
_TAR_MTIME = 1_700_000_000.0  # fixed, so the same samples give byte-identical shards


@dataclass
class Sample:
    """One image-caption pair to write; `key` must be unique in the dataset and free of '.' and '/'."""

    key: str
    image: Image.Image
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardSummary:
    """What write_shards wrote."""

    shards: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # samples per shard
    skipped: Counter = field(default_factory=Counter)  # reason -> samples the writer could not encode

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


# ----------------------------------------------------------------------------------------------------------
# Writing


def _storable(img: Image.Image, image_format: ImageFormat) -> Image.Image:
    if image_format == "jpg":
        return img if img.mode in ("RGB", "L") else to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "L") and image_format == "webp":  # WebP stores only RGB(A)
        img = img.convert("RGBA" if img.mode == "LA" else "RGB")
    return img if img.mode in ("RGB", "RGBA", "L", "LA") else to_rgb(img)


def encode_image(img: Image.Image, image_format: ImageFormat = "jpg", *, max_side: int | None = None,
                 quality: int = 95) -> tuple[bytes, dict[str, int]]:
    """Encode `img`, downscaled so its longest side is at most `max_side`; returns bytes and size metadata."""
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(PIL_FORMATS)}, got {image_format!r}")
    orig_w, orig_h = img.size
    img = _storable(img, image_format)
    if max_side is not None and max(orig_w, orig_h) > max_side:
        scale = max_side / max(orig_w, orig_h)
        size = (max(1, round(orig_w * scale)), max(1, round(orig_h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    img.save(buf, format=PIL_FORMATS[image_format], **options)
    meta = {"width": img.width, "height": img.height, "original_width": orig_w, "original_height": orig_h}
    return buf.getvalue(), meta


def write_shard(path: Path, records: list[dict[str, Any]], t_start: float) -> None:
    """One tar of ready-encoded records (`__key__` + extension -> bytes) and its img2dataset `_stats.json`,
    written under a temporary name first."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=_TAR_MTIME) as writer:
        for record in records:
            writer.write(record)
    os.replace(tmp, path)  # a crash never leaves a complete-looking shard behind
    n = len(records)
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
             "duration": time.time() - t_start, "start_time": t_start, "end_time": time.time(),
             "status_dict": {"success": n}}
    stats_path(path).write_text(json.dumps(stats, indent=2))


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, *, shard_size: int = 1000,
                 image_format: ImageFormat = "jpg", max_side: int | None = None, quality: int = 95,
                 prefix: str = "") -> ShardSummary:
    """Write `{prefix}{00000..}.tar` shards of `shard_size` samples plus img2dataset `*_stats.json` files."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(PIL_FORMATS)}, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, records, t_start = ShardSummary(), [], time.time()

    def flush() -> None:
        nonlocal records, t_start
        path = out / f"{prefix}{len(summary.shards):05d}.tar"
        write_shard(path, records, t_start)
        summary.shards.append(path)
        summary.counts.append(len(records))
        records, t_start = [], time.time()

    for sample in samples:
        if "." in sample.key or "/" in sample.key:  # WebDataset splits the key at the first dot
            raise ValueError(f"sample keys must not contain '.' or '/', got {sample.key!r}")
        try:
            data, size_meta = encode_image(sample.image, image_format, max_side=max_side, quality=quality)
        except (OSError, ValueError):  # e.g. a lazily loaded image whose pixel data is truncated
            summary.skipped["unencodable_image"] += 1
            continue
        meta = {"key": sample.key, "caption": sample.caption, **sample.metadata, **size_meta}
        records.append({"__key__": sample.key, image_format: data, "txt": sample.caption.encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8")})
        if len(records) == shard_size:
            flush()
    if records or not summary.shards:
        flush()
    return summary


# ----------------------------------------------------------------------------------------------------------
# Reading the index: shard specs and per-shard sample counts


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def stats_path(url: str | os.PathLike) -> Path:
    """img2dataset's per-shard statistics file: `.../00012.tar` -> `.../00012_stats.json`."""
    path = Path(url)
    return path.with_name(path.name.removesuffix(".tar") + "_stats.json")


def _expand_local(spec: str) -> list[str]:
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not found:
            raise FileNotFoundError(f"directory {spec!r} contains no *.tar shards")
        return found
    urls, missing = [], []
    for part in braceexpand.braceexpand(spec):
        if glob.has_magic(part):
            urls.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            urls.append(part)
        else:
            missing.append(part)
    if not urls and not glob.has_magic(spec) and "{" not in spec and not spec.endswith(".tar"):
        raise FileNotFoundError(f"shard directory {spec!r} does not exist")
    if not urls:
        raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist: {shown}")
    return urls


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Brace pattern, glob, directory (its *.tar, sorted), URL/`pipe:` or a list of those -> shard URLs.

    Local shards are checked here so that a typo fails at start-up, not in a worker.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec).removeprefix("file://")
        urls = list(braceexpand.braceexpand(spec)) if is_remote(spec) else _expand_local(spec)
    else:
        urls = [url for item in spec for url in expand_urls(item)]
    if not urls:
        raise ValueError("no shards given")
    duplicates = [url for url, n in Counter(urls).items() if n > 1]
    if duplicates:  # a shard listed twice would be read twice per epoch
        raise ValueError(f"shard list contains duplicates, e.g. {duplicates[0]!r}")
    return urls


SAMPLE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "latent.npy")  # a sample the loader can use has one of these


@dataclass(frozen=True)
class TarScan:
    """What a local tar's headers promise: `samples` = keys with an image (or cached latent) member; `problem`
    says why a tar gives none or fewer than it holds ("empty", "not a tar", "no image", "truncated")."""

    samples: int
    keys: int
    problem: str | None = None


def scan_tar(path: str | os.PathLike) -> TarScan:
    """Scan a local tar's headers (no member data is read)."""
    keys, usable, problem = set(), set(), None
    try:
        if os.path.getsize(path) == 0:
            return TarScan(0, 0, "empty")
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                if not member.isreg() or member.name.startswith("__"):
                    continue
                key, ext = base_plus_ext(member.name)
                if key is not None:
                    keys.add(key)
                    if ext is not None and ext.lower() in SAMPLE_EXTENSIONS:
                        usable.add(key)
    except tarfile.ReadError as e:
        problem = "truncated" if keys else "empty" if "empty" in str(e) else "not a tar"
    except (tarfile.TarError, OSError, EOFError):
        problem = "truncated" if keys else "not a tar"
    if problem is None and not keys:
        problem = "empty"
    elif problem is None and not usable:
        problem = "no image"
    return TarScan(len(usable), len(keys), problem)


def scan_tar_keys(path: str | os.PathLike) -> int:
    """Samples in a local tar with an image (or latent) member, from the headers; a corrupt tail ends the count."""
    return scan_tar(path).samples


SCAN_CACHE_ENV = "LDM_SCAN_CACHE"  # folder of the header-scan cache; "off" disables it


class ScanCache:
    """Header-scan counts of local tars without stats, keyed by (path, size, mtime): a second start-up on a large
    dataset reads one json instead of every tar's headers. One file per shard folder under `root` (default
    ~/.cache/ldm/shard_scans, or $LDM_SCAN_CACHE), written atomically (ranks may write it at once)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        root = root or os.environ.get(SCAN_CACHE_ENV) or Path.home() / ".cache" / "ldm" / "shard_scans"
        self.root = None if str(root) == "off" else Path(root)
        self._files: dict[Path, dict[str, list[int]]] = {}
        self._dirty: set[Path] = set()

    def _file(self, url: str) -> Path | None:
        if self.root is None:
            return None
        folder = str(Path(url).resolve().parent)
        return self.root / f"{hashlib.sha1(folder.encode()).hexdigest()[:16]}.json"

    def _entries(self, file: Path) -> dict[str, list[int]]:
        if file not in self._files:
            try:
                self._files[file] = json.loads(file.read_text())
            except (OSError, ValueError):
                self._files[file] = {}
        return self._files[file]

    def count(self, url: str) -> int:
        """The tar's usable samples, from the cache when the file is unchanged, else scanned (and remembered)."""
        file = self._file(url)
        if file is None:
            return scan_tar(url).samples
        stat = os.stat(url)
        key, entries = os.path.basename(url), self._entries(file)
        cached = entries.get(key)
        if cached is not None and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
            return cached[2]
        entries[key] = [stat.st_size, stat.st_mtime_ns, scan_tar(url).samples]
        self._dirty.add(file)
        return entries[key][2]

    def save(self) -> None:
        for file in self._dirty:
            with contextlib.suppress(OSError):  # a read-only home: scan again next time
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(self._files[file]))
                tmp.replace(file)
        self._dirty.clear()


def count_shard_samples(url: str, cache: ScanCache | None = None) -> int | None:
    """Samples in a shard: `successes` from its `_stats.json`, else a header scan (through `cache`); None for remote
    shards."""
    if is_remote(url):
        return None
    stats = stats_path(url)
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass  # malformed stats: fall back to the tar itself
    return cache.count(url) if cache is not None else scan_tar(url).samples


def shard_sample_counts(urls: Sequence[str], samples_per_shard: int | None = None,
                        cache: ScanCache | None = None) -> list[int]:
    """Per-shard sample counts for epoch-mode bookkeeping; `samples_per_shard` overrides them all. Tars without
    stats are scanned through `cache` (default: the user's ScanCache)."""
    if samples_per_shard is not None:
        return [samples_per_shard] * len(urls)
    cache = cache or ScanCache()
    counts = [count_shard_samples(url, cache) for url in urls]
    cache.save()
    unknown = [url for url, n in zip(urls, counts) if n is None]
    if unknown:
        raise ValueError(
            f"cannot count the samples of remote shard {unknown[0]!r} (no local _stats.json): "
            "pass samples_per_shard=<int>, or use mode='resampled' with batches_per_epoch")
    return counts  # type: ignore[return-value]


def check_some_samples(urls: Sequence[str], counts: Sequence[int]) -> None:
    """A clear start-up error when no shard can give a sample (rather than an empty epoch or a reader spinning
    over empty tars), naming what is wrong with them."""
    if any(counts):
        return
    problems = Counter(scan_tar(url).problem or "stats say 0 samples" for url in urls)
    shown = ", ".join(f"{n} {problem}" for problem, n in problems.most_common())
    raise ValueError(f"none of the {len(urls)} shard(s) holds a usable sample (an image or cached latent with a "
                     f"key): {shown} (e.g. {urls[0]}). img2dataset writes empty tars when every download of a shard "
                     "failed; check its *_stats.json files.")


# ----------------------------------------------------------------------------------------------------------
# Sources for scripts/make_shards.py


def _load_image(path: Path) -> Image.Image | None:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def folder_samples(root: str | os.PathLike, skipped: Counter,
                   progress: Callable[[int], None] | None = None) -> Iterator[Sample]:
    """Images under `root` (recursive, sorted) with sibling `.txt` captions; skip reasons go to `skipped`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for index, path in enumerate(paths):
        if progress is not None:
            progress(1)
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            skipped["missing_caption"] += 1
            continue
        caption = _read_caption(caption_path)
        if caption is None:
            skipped["bad_caption"] += 1
            continue
        img = _load_image(path)
        if img is None:
            skipped["unreadable_image"] += 1
            continue
        yield Sample(f"{index:09d}", img, caption, {"source": str(path.relative_to(root))})


def table_samples(table: str | os.PathLike, skipped: Counter, *, path_column: str = "path",
                  caption_column: str = "caption", root: str | os.PathLike | None = None,
                  progress: Callable[[int], None] | None = None) -> Iterator[Sample]:
    """Rows of a CSV/TSV (tab-separated if the name ends in .tsv/.tab); paths are relative to `root`."""
    table = Path(table)
    root = Path(root) if root is not None else table.parent
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for name in (path_column, caption_column):
            if name not in columns:
                raise ValueError(f"column {name!r} not in {str(table)!r}; columns are {columns}")
        for index, row in enumerate(reader):
            if progress is not None:
                progress(1)
            caption, path = row.get(caption_column), root / (row.get(path_column) or "")
            if caption is None:
                skipped["missing_caption"] += 1
            elif not path.is_file():
                skipped["missing_file"] += 1
            elif (img := _load_image(path)) is None:
                skipped["unreadable_image"] += 1
            else:
                yield Sample(f"{index:09d}", img, caption.strip(), {"source": str(row.get(path_column))})
