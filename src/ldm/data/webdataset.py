"""Image-caption batches from WebDataset shards (img2dataset layout) with explicit rank/worker shard assignment,
skip counting by cause and equal-length epochs across DDP ranks.

Epoch length (mode="epoch"): a shard's size is `successes` from the `NNNNN_stats.json` beside it, else the
number of distinct keys in the local tar's headers; remote shards without stats need `samples_per_shard` (or
mode="resampled"). Shards are permuted with (seed, epoch), identically on every rank, and shard i of the
permutation goes to slot i mod (world_size * num_workers), slot = worker * world_size + rank. Each worker
batches its own samples and drops its partial batch, so rank r owns sum_w floor(n_rw / batch_size) batches and
every rank yields exactly the minimum of that over ranks. A rank with more drops the rest for this epoch (the
next permutation brings them back); with several ranks, a rank left short by skipped samples restarts its stream
from the start, and each such batch carries skips["padded_batches"] = 1 (a count of batches, not samples). A single
rank is never padded: its epoch ends early instead, so it sees every good sample exactly once (but for each
worker's partial last batch, dropped with drop_last). The count can
differ by a batch or two between epochs; Lightning reads len() once unless reload_dataloaders_every_n_epochs=1
(then each epoch is exact), otherwise it cuts longer epochs at the first one's length; all ranks agree either way.

Skip counts: batch["skips"] holds the samples its worker skipped since that worker's previous batch, by cause
(SKIP_CAUSES). A worker holds each full batch back until its next one is full or its stream ends, so skips
after its last batch ride on that batch; they are lost only when no further batch of that worker is consumed
(the surplus batches a rank drops, or a loop that stops early).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ldm.data.shards import check_some_samples, expand_urls, is_remote, shard_sample_counts
from ldm.data.transforms import ImageTransform, SkipSample, to_unit_range

SKIP_CAUSES = ("corrupt_image", "missing_image", "bad_caption", "too_small", "too_large", "bad_shard",
               "empty_shard", "filtered", "corrupt_latent", "unbatched", "left_out", "padded_batches")
# Causes that count samples (the others count shard reads and batches): with the delivered samples and "left_out"
# they add up to the samples a rank's shards hold in an epoch.
SAMPLE_CAUSES = ("corrupt_image", "missing_image", "bad_caption", "too_small", "too_large", "filtered",
                 "corrupt_latent", "unbatched")
LATENT_EXTENSION = "latent.npy"  # cached posterior of one image: (2, c, h, w) = (mean, std), see data/latent_cache
# cached text-encoder states of its caption (optional): tokens (L, D), pooled (P,), mask (L,) bool
TEXT_EXTENSIONS = ("text_tokens.npy", "text_pooled.npy", "text_mask.npy")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # where PIL's own DecompressionBombError starts
SAMPLE_SPLIT_BELOW = 4  # split="auto": samples, not whole shards, are dealt to readers below this many shards each
_MAX_CONSECUTIVE_SKIPS = 10_000  # resampled mode: give up instead of spinning on unusable data
Batch = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Shard assignment and epoch length


def _slots(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"need 0 <= rank < world_size and 0 <= worker < num_workers, got rank={rank}, "
                         f"world_size={world_size}, worker={worker}, num_workers={num_workers}")
    # Interleave ranks within each worker index so ranks get near-equal shard counts.
    return worker * world_size + rank, world_size * num_workers


def _shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed % 2**63, epoch]).permutation(num_shards).tolist()


def assign_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int,
                  epoch: int, seed: int, shuffle: bool) -> list[str]:
    """This worker's shards: one (seed, epoch) permutation shared by all ranks, split into disjoint slots."""
    slot, num_slots = _slots(rank, world_size, worker, num_workers)
    return [urls[i] for i in _shard_order(len(urls), epoch, seed, shuffle)[slot::num_slots]]


def worker_batches(n: int, batch_size: int, buckets: int = 1, drop_last: bool = True) -> int:
    """Batches one worker makes from n samples spread over `buckets` sizes, whatever the spread: at least
    ceil((n - buckets (B - 1)) / B) full ones (each bucket leaves fewer than B over), which is floor(n / B) for one
    bucket; without drop_last at most ceil(n / B) + buckets - 1 (a partial batch per bucket)."""
    if drop_last:
        return max(0, -(-(n - buckets * (batch_size - 1)) // batch_size))
    return min(n, -(-n // batch_size) + buckets - 1)


def worker_samples(counts: Sequence[int], *, rank: int, world_size: int, num_workers: int, epoch: int, seed: int,
                   shuffle: bool, split: Literal["shard", "sample"] = "shard") -> list[int]:
    """The samples each of a rank's workers reads in `epoch`, from `counts` samples per shard: the sum over its
    shards, or with split="sample" its share of all samples (slot s of S takes indices s, s + S, ...)."""
    workers, order = max(1, num_workers), _shard_order(len(counts), epoch, seed, shuffle)
    slots = [_slots(rank, world_size, worker, workers) for worker in range(workers)]
    if split == "sample":
        total = sum(counts)
        return [total // num_slots + (slot < total % num_slots) for slot, num_slots in slots]
    return [sum(counts[i] for i in order[slot::num_slots]) for slot, num_slots in slots]


def rank_batches(counts: Sequence[int], *, world_size: int, num_workers: int, batch_size: int, epoch: int,
                 seed: int, shuffle: bool, drop_last: bool = True, buckets: int = 1,
                 split: Literal["shard", "sample"] = "shard") -> list[int]:
    """Batches each rank's workers produce from `counts` samples per shard (partial batches per worker)."""
    return [sum(worker_batches(n, batch_size, buckets, drop_last)
                for n in worker_samples(counts, rank=rank, world_size=world_size, num_workers=num_workers,
                                        epoch=epoch, seed=seed, shuffle=shuffle, split=split))
            for rank in range(world_size)]


def derive_seed(seed: int, rank: int, worker: int, epoch: int, stream: int = 0) -> int:
    """A 32-bit seed for one (seed, rank, worker, epoch) and purpose `stream`, independent across all five."""
    entropy = [seed % 2**63, rank, worker, epoch, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _init_worker(worker_id: int, *, seed: int, rank: int, epoch: int, max_pixels: int) -> None:
    torch.set_num_threads(1)  # two busy workers on two cores slow each other down several times otherwise
    s = derive_seed(seed, rank, worker_id, epoch, stream=0)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    # Our header check enforces max_pixels; PIL's error (at 2x its limit) then only fires on worse bombs.
    Image.MAX_IMAGE_PIXELS = max_pixels


# ----------------------------------------------------------------------------------------------------------
# Reading and decoding


def _open(url: str):
    if url.startswith("s3://"):  # gopen has no s3 scheme; stream through the AWS CLI instead
        url = f"pipe:aws s3 cp {url} -"
    return gopen(url)


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def _group_by_key(entries: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    sample: dict[str, Any] | None = None
    try:
        for entry in entries:
            key, ext = base_plus_ext(entry["fname"])
            if key is None:
                continue
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "__url__": url}
            sample[ext.lower()] = entry["data"]
    except _TAR_ERRORS:
        # A tar that breaks mid-member: the members read so far are whole (a member's data is read before it is
        # handed on). The sample being grouped is delivered when it has a caption and an image (or latent): the
        # break came in the next sample's first member. Otherwise it is the half-read sample the break cut off,
        # lost with the shard (counted once, as bad_shard) rather than blamed on a missing caption or image.
        if sample is not None and "txt" in sample and any(ext in sample for ext in (*IMAGE_EXTENSIONS,
                                                                                   LATENT_EXTENSION)):
            yield sample
        raise
    if sample is not None:
        yield sample


def read_shard(url: str) -> Iterator[dict[str, Any] | str]:
    """Raw samples {"__key__", ext: bytes} of one shard. A shard that cannot be read to its end ends with the cause
    "bad_shard" (one per failed read, after the samples read before the failure); one that holds no sample at all
    gives "empty_shard"."""
    try:
        stream = _open(url)
    except (OSError, ValueError):
        yield "bad_shard"
        return
    samples = 0
    try:
        for sample in _group_by_key(tar_file_iterator(stream), url):
            samples += 1
            yield sample
        if samples == 0:
            yield "empty_shard"
    except _TAR_ERRORS as e:  # a 0-byte file is an empty shard too ("empty file"); an empty stream, a failed fetch
        empty = samples == 0 and isinstance(e, tarfile.ReadError) and "empty file" in str(e) and not is_remote(url)
        yield "empty_shard" if empty else "bad_shard"
    finally:
        # A pipe we stop reading early reports its SIGPIPE exit here; failed reads were already counted above.
        with contextlib.suppress(OSError):
            stream.close()


def _own(raws: Iterator[dict[str, Any] | str], slot: int, num_slots: int) -> Iterator[dict[str, Any] | str]:
    """Sample-level split: every reader reads every shard in the same order and keeps the samples whose running
    index is its slot modulo the slots, so the readers' samples are disjoint and within one of each other in number.
    Shard-level causes (bad_shard, empty_shard) are counted by slot 0 alone."""
    index = 0
    for raw in raws:
        if isinstance(raw, str):
            if slot == 0:
                yield raw
            continue
        if index % num_slots == slot:
            yield raw
        index += 1


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        if isinstance(item, str):  # skip causes pass straight through
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _metadata(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def passes_filters(meta: dict[str, Any], filters: dict[str, float]) -> bool:
    """min_width/min_height test the original size (json original_width, else width); any other key k
    requires json[k] >= value. Missing or non-numeric metadata fails the filter."""
    for key, threshold in filters.items():
        if key in ("min_width", "min_height"):
            side = key.removeprefix("min_")
            value = meta.get(f"original_{side}", meta.get(side))
        else:
            value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= threshold:
            return False
    return True


def collate(samples: list[dict[str, Any]], skips: Counter) -> Batch:
    # Workers ship uint8 (4x less to copy) and default_collate stacks straight into shared memory, so the
    # hand-off to the main process copies nothing; ShardLoader converts to float there.
    field = "latent" if "latent" in samples[0] else "image"
    batch = {
        field: default_collate([s[field] for s in samples]),  # image (B, 3, H, W) uint8 | latent (B, 2, c, h, w)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "skips": {cause: int(skips[cause]) for cause in SKIP_CAUSES},
    }
    if "text" in samples[0]:  # cached text states: (tokens (B, L, D), pooled (B, P), mask (B, L)), a Conditioning's
        batch["text"] = tuple(default_collate(list(f)) for f in zip(*(s["text"] for s in samples)))
    return batch


def _caption(raw: dict[str, Any]) -> str:
    try:
        return raw["txt"].decode("utf-8").strip()  # empty is fine: it is the unconditional prompt
    except (KeyError, UnicodeDecodeError) as e:
        raise SkipSample("bad_caption", repr(e)) from e


# ----------------------------------------------------------------------------------------------------------
# Dataset (runs inside each DataLoader worker)


class ShardDataset(IterableDataset):
    """Yields whole batches from this worker's shards; built and configured by ShardLoader."""

    def __init__(self, urls: list[str], *, batch_size: int, transform: ImageTransform,
                 mode: Literal["epoch", "resampled"], rank: int, world_size: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, drop_last: bool, min_side: int, max_pixels: int,
                 metadata_filters: dict[str, float] | None, split: Literal["shard", "sample"] = "shard"):
        super().__init__()
        self.split = split
        self.urls, self.batch_size, self.transform, self.mode = urls, batch_size, transform, mode
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.min_side, self.max_pixels = min_side, max_pixels
        self.metadata_filters = dict(metadata_filters or {})
        self.epoch = 0

    def decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Raw sample -> {"image", "caption", "key"}; raises SkipSample. Cheap checks run before decoding."""
        caption = _caption(raw)
        if self.metadata_filters and not passes_filters(_metadata(raw), self.metadata_filters):
            raise SkipSample("filtered")
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            raise SkipSample("missing_image")
        image = self.transform.decode_uint8(data, rng, min_side=self.min_side, max_pixels=self.max_pixels)
        return {"image": image, "caption": caption, "key": raw["__key__"]}


    def _shards(self, worker: int, num_workers: int) -> Iterator[str]:
        if self.mode == "epoch" and self.split == "sample":  # every shard, this slot's samples of each (_own)
            yield from (self.urls[i] for i in _shard_order(len(self.urls), self.epoch, self.seed, self.shuffle))
            return
        if self.mode == "epoch":
            yield from assign_shards(self.urls, self.rank, self.world_size, worker, num_workers,
                                     self.epoch, self.seed, self.shuffle)
            return
        rng = random.Random(derive_seed(self.seed, self.rank, worker, self.epoch, stream=1))
        while True:  # resampled: shards drawn with replacement, a different stream per rank and worker
            yield self.urls[rng.randrange(len(self.urls))]

    def _decoded(self, raws: Iterator[dict[str, Any] | str], rng: random.Random) -> Iterator[dict | str]:
        consecutive, causes = 0, Counter()
        for raw in raws:
            if isinstance(raw, str):
                cause = raw
            else:
                try:
                    sample = self.decode(raw, rng)
                except SkipSample as e:
                    cause = e.cause
                else:
                    consecutive, causes = 0, Counter()
                    yield sample
                    continue
            yield cause
            consecutive += 1
            causes[cause] += 1
            if self.mode == "resampled" and consecutive >= _MAX_CONSECUTIVE_SKIPS:
                shown = ", ".join(f"{n} {c}" for c, n in causes.most_common())
                raise RuntimeError(f"resampled mode read {consecutive} samples and shards in a row without a usable "
                                   f"sample ({shown}) from shards like {self.urls[0]!r}: check the shards (or the "
                                   "metadata_filters)")

    def _batches(self, items: Iterator[dict | str]) -> Iterator[Batch]:
        """Whole batches of one size each (one aspect-ratio bucket, or one latent shape); with drop_last, the samples
        left in unfilled buckets at the end of the stream are counted as "unbatched" on the last batch."""
        skips: Counter = Counter()
        pending: list[dict] | None = None  # held back so later skips can still ride on it
        groups: dict[tuple[int, ...], list[dict]] = {}
        for item in items:
            if isinstance(item, str):
                skips[item] += 1
                continue
            group = groups.setdefault(tuple(item.get("image", item.get("latent")).shape), [])
            group.append(item)
            if len(group) == self.batch_size:
                if pending is not None:
                    yield collate(pending, skips)
                    skips = Counter()
                pending = group.copy()
                group.clear()
        leftovers = [g for g in groups.values() if g]
        if self.drop_last:
            skips["unbatched"] += sum(len(g) for g in leftovers)
            leftovers = []
        tail = [b for b in (pending, *leftovers) if b]
        for i, samples in enumerate(tail):
            yield collate(samples, skips if i == 0 else Counter())

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = random.Random(derive_seed(self.seed, self.rank, worker, self.epoch, stream=2))
        raws = (raw for url in self._shards(worker, num_workers) for raw in read_shard(url))
        if self.mode == "epoch" and self.split == "sample":
            raws = _own(raws, *_slots(self.rank, self.world_size, worker, num_workers))
        if self.shuffle and self.shuffle_buffer > 1:
            raws = _shuffled(raws, self.shuffle_buffer, rng)
        yield from self._batches(self._decoded(raws, rng))


class LatentShardDataset(ShardDataset):
    """The same sharding, shuffling and skipping over latent shards written by `ldm.data.latent_cache`; with
    `text_states`, each sample also carries its caption's cached text-encoder states ("text": tokens, pooled, mask),
    and a record without them (or with unreadable ones) is skipped as corrupt_latent."""

    def __init__(self, *args: Any, text_states: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.text_states = text_states

    def decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        caption = _caption(raw)
        latent = _npy(raw, LATENT_EXTENSION)
        if latent.ndim != 4 or latent.shape[0] != 2 or not bool(latent.isfinite().all()):
            raise SkipSample("corrupt_latent", f"shape {tuple(latent.shape)} or non-finite values")
        sample = {"latent": latent, "caption": caption, "key": raw["__key__"]}
        if self.text_states:
            tokens, pooled, mask = (_npy(raw, ext) for ext in TEXT_EXTENSIONS)
            if (tokens.ndim != 2 or pooled.ndim != 1 or mask.shape != tokens.shape[:1] or mask.dtype != torch.bool
                    or not bool(tokens.isfinite().all() and pooled.isfinite().all())):
                raise SkipSample("corrupt_latent", f"text states of shapes {tuple(tokens.shape)}, "
                                                   f"{tuple(pooled.shape)}, {tuple(mask.shape)} or non-finite values")
            sample["text"] = (tokens, pooled, mask)
        return sample


def _npy(raw: dict[str, Any], ext: str) -> torch.Tensor:
    """One cached array of a record; a missing or unreadable one skips the sample as corrupt_latent."""
    try:
        return torch.from_numpy(np.load(io.BytesIO(raw[ext]), allow_pickle=False))
    except (KeyError, ValueError, OSError) as e:
        raise SkipSample("corrupt_latent", f"{ext}: {e!r}") from e


# ----------------------------------------------------------------------------------------------------------
# Loader (what a LightningDataModule returns)


class ShardLoader:
    """A DataLoader over this rank's shards that yields exactly `len(self)` batches per epoch.

    Args:
        shards: brace pattern, directory, list of paths, or URLs (`pipe:`, `http(s)://`, `s3://`...).
        mode: "epoch" (finite, each sample at most once per epoch) or "resampled" (shards drawn with
            replacement, `batches_per_epoch` batches per rank; needs no sample counts).
        batches_per_epoch: required for "resampled"; in "epoch" mode an optional cap.
        drop_last: True drops each worker's partial batch and equalises ranks (see module docstring);
            False keeps every sample and never pads, for single-rank validation.
        samples_per_shard: overrides the per-shard counts (for remote shards without `_stats.json`).
        latents: read latent shards (`ldm.data.latent_cache`): batches carry "latent" (B, 2, c, h, w) = posterior
            (mean, std) instead of "image"; resolution, crop and flip then play no part.
        text_states: with latents, batches also carry the cached text-encoder states ("text": tokens (B, L, D),
            pooled (B, P), mask (B, L)); records without them are skipped as corrupt_latent.
        buckets: aspect-ratio buckets, (h, w) sizes (ldm.data.buckets.make_buckets): each image is resized to cover
            the nearest and cropped by the least, and each batch holds one bucket. The epoch length then counts on
            the worst spread over buckets (see worker_batches); samples left in unfilled buckets are "unbatched".
        num_buckets: how many sizes a latent cache holds (its card says), for the epoch length.
        split: epoch mode: "shard" deals whole shards to the readers (ranks x workers), "sample" deals every shard's
            samples in turn (reader r of R keeps sample indices r, r + R, ...: each reader reads every shard and
            decodes only its own, so readers get equal shares from any number of shards), "auto" samples below
            SAMPLE_SPLIT_BELOW shards per reader, where whole shards would leave them unequal.
    """

    def __init__(self, shards: str | Sequence[str], *, batch_size: int, resolution: int,
                 mode: Literal["epoch", "resampled"] = "epoch", rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, batches_per_epoch: int | None = None, shuffle: bool = True,
                 shuffle_buffer: int = 500, drop_last: bool = True, crop: Literal["center", "random"] = "random",
                 flip: bool = True, min_side: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS,
                 metadata_filters: dict[str, float] | None = None, samples_per_shard: int | None = None,
                 seed: int = 0, pin_memory: bool = False, latents: bool = False,
                 buckets: Sequence[tuple[int, int]] | None = None, num_buckets: int | None = None,
                 split: Literal["auto", "shard", "sample"] = "auto", text_states: bool = False):
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
        if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size, got "
                             f"{batch_size=}, {num_workers=}, {rank=}, {world_size=}")
        if mode == "resampled" and not batches_per_epoch:
            raise ValueError("mode='resampled' needs batches_per_epoch (batches per rank per epoch)")
        if not drop_last and (world_size > 1 or mode == "resampled"):
            raise ValueError("drop_last=False is only for mode='epoch' on a single rank: ranks must run "
                             "equal-length epochs")
        if split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be 'auto', 'shard' or 'sample', got {split!r}")
        self.urls = expand_urls(shards)
        slots = world_size * max(1, num_workers)
        if split == "auto":  # few shards per reader: whole shards would leave the readers unequal
            split = "sample" if mode == "epoch" and len(self.urls) < SAMPLE_SPLIT_BELOW * slots else "shard"
        self.split = split
        self.mode, self.rank, self.world_size, self.num_workers = mode, rank, world_size, num_workers
        self.batch_size, self.batches_per_epoch, self.drop_last = batch_size, batches_per_epoch, drop_last
        self.seed, self.shuffle, self.pin_memory, self.epoch = seed, shuffle, pin_memory, 0
        self.latents = latents
        self.max_pixels = max_pixels
        self.num_buckets = num_buckets or (len(buckets) if buckets else 1)
        if text_states and not latents:
            raise ValueError("text_states=True needs latents=True: text states are cached in latent shards")
        dataset = partial(LatentShardDataset, text_states=text_states) if latents else ShardDataset
        self.shard_dataset = dataset(
            self.urls, batch_size=batch_size, transform=ImageTransform(resolution, crop, flip, buckets), mode=mode,
            rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
            drop_last=drop_last, min_side=min_side, max_pixels=max_pixels, metadata_filters=metadata_filters,
            split=split)
        self.counts: list[int] | None = None
        self._skip: tuple[int, int] | None = None  # (epoch, batches) already trained on before a restart
        if mode == "epoch":
            self._check_epoch_mode(samples_per_shard)
        elif samples_per_shard is None and not any(is_remote(u) for u in self.urls):
            check_some_samples(self.urls, shard_sample_counts(self.urls))  # else resampling would spin on them

    def _check_epoch_mode(self, samples_per_shard: int | None) -> None:
        slots = self.world_size * max(1, self.num_workers)
        if len(self.urls) < slots and self.split == "shard":
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split over {self.world_size} rank(s) x "
                f"{max(1, self.num_workers)} worker(s) = {slots} slots with split='shard': use split='sample' "
                "(or 'auto'), write more, smaller shards, or use mode='resampled'")
        self.counts = shard_sample_counts(self.urls, samples_per_shard)
        check_some_samples(self.urls, self.counts)
        if len(self) == 0:
            raise ValueError(f"an epoch has 0 batches: per-rank batches {self.batches_per_rank()} with "
                             f"batch_size={self.batch_size} over {sum(self.counts)} samples")

    # Lightning calls `loader.sampler.set_epoch(epoch)` on every train/val loader at each epoch start. There is
    # deliberately no `.dataset`: Lightning would then warn that an IterableDataset defines __len__.
    batch_sampler = None

    @property
    def sampler(self) -> ShardLoader:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_after(self, epoch: int, batches: int) -> None:
        """The next pass over `epoch` starts after its first `batches` batches (exact resume mid-epoch).

        The skipped batches are replayed from the deterministic stream and dropped rather than trained on, so the
        samples after the restart are exactly those an uninterrupted run would have seen; the cost is their
        reading and decoding time (nothing for a latent cache)."""
        self._skip = (epoch, batches) if batches > 0 else None

    def batches_per_rank(self, epoch: int | None = None) -> list[int]:
        """Epoch mode: batches each rank's workers can fill in `epoch` (default: the current one)."""
        assert self.counts is not None, "only defined in mode='epoch'"
        return rank_batches(self.counts, world_size=self.world_size, num_workers=self.num_workers,
                            batch_size=self.batch_size, epoch=self.epoch if epoch is None else epoch,
                            seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last,
                            buckets=self.num_buckets, split=self.split)

    def __len__(self) -> int:
        if self.mode == "resampled":
            return int(self.batches_per_epoch)  # type: ignore[arg-type]
        per_rank = self.batches_per_rank()
        n = min(per_rank) if self.drop_last else per_rank[self.rank]
        return min(n, self.batches_per_epoch) if self.batches_per_epoch else n

    def _dataloader(self) -> DataLoader:
        self.shard_dataset.epoch = self.epoch
        init = partial(_init_worker, seed=self.seed, rank=self.rank, epoch=self.epoch, max_pixels=self.max_pixels)
        # Its own generator: creating a DataLoader iterator draws a base seed, which from the global RNG would make
        # a resumed run (which creates one mid-epoch) diverge from an uninterrupted one. Workers reseed anyway.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, 0, self.epoch, stream=3))
        # Workers come from a forkserver, not a fork of this process: a fork taken while DDP's gloo threads or the
        # previous epoch's queue threads hold a lock deadlocked a worker before it ran (seen once in ten 2-rank runs;
        # the other rank then waits in all-reduce forever). The server is forked once from a clean process.
        context = None
        if self.num_workers and "forkserver" in mp.get_all_start_methods():
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # the server imports torch and this module once, at start
        # Latent batches are final as the workers collate them: the DataLoader pins them in its own thread, off the
        # training loop's (images are converted to float first and pinned after, in _to_float).
        pin = self.pin_memory and self.latents and torch.cuda.is_available()
        return DataLoader(self.shard_dataset, batch_size=None, num_workers=self.num_workers, worker_init_fn=init,
                          prefetch_factor=2 if self.num_workers else None, generator=generator,
                          multiprocessing_context=context, pin_memory=pin)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(x)  # (B, 3, H, W) float in [-1, 1]
        # Pinned here rather than by the DataLoader, which would pin the uint8 batch we then replace.
        return x.pin_memory() if self.pin_memory and torch.cuda.is_available() else x

    def rank_samples(self) -> int | None:
        """Epoch mode: the samples this rank's shards hold this epoch (from their stats or headers)."""
        if self.counts is None:
            return None
        return sum(worker_samples(self.counts, rank=self.rank, world_size=self.world_size,
                                  num_workers=self.num_workers, epoch=self.epoch, seed=self.seed, shuffle=self.shuffle,
                                  split=self.split))

    def __iter__(self) -> Iterator[Batch]:
        n, done, padding = len(self), 0, False
        skip = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        self._skip = None
        expected, accounted = self.rank_samples(), 0  # samples delivered or counted under a per-sample cause
        while done < n:
            produced = 0
            for batch in islice(self._dataloader(), n - done):  # stop without pulling a surplus batch
                accounted += len(batch["key"]) + sum(batch["skips"][c] for c in SAMPLE_CAUSES)
                if skip > 0:  # trained on before the restart: same stream, dropped
                    skip, done, produced = skip - 1, done + 1, produced + 1
                    continue
                if padding:  # repeats: only the padding counter, so totals don't count a skip twice
                    batch["skips"] = {cause: int(cause == "padded_batches") for cause in SKIP_CAUSES}
                elif done == n - 1 and expected is not None and self.drop_last:  # the epoch stops here
                    batch["skips"]["left_out"] = max(0, expected - accounted)
                if "image" in batch:
                    batch["image"] = self._to_float(batch["image"])
                yield batch
                done, produced = done + 1, produced + 1
            if produced == 0:
                raise RuntimeError(f"rank {self.rank} found no usable sample in {len(self.urls)} shards "
                                   f"(epoch {self.epoch}) and cannot fill its {n} batches")
            if not self.drop_last or self.world_size == 1:
                return  # one rank: the epoch ends early rather than repeat samples (nobody waits for it)
            # Only a rank of several left short (skipped samples, broken shards) gets here: the ranks must run equal
            # epochs, so it reruns its stream as padding.
            padding = True
