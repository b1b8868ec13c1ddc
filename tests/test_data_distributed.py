"""Sharding across ranks and workers: ranks are simulated in one process (rank=0/1, world_size=2), each with
two real DataLoader worker processes; samples are tracked by key."""

import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ldm.data.shards import Sample, write_shards
from ldm.data.webdataset import ShardLoader, assign_shards

SHARD_SIZES = [7, 9, 8, 10, 6, 11, 5, 9, 8, 7]  # uneven on purpose: ranks differ in sample count
BATCH = 3


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for shard, size in enumerate(SHARD_SIZES):
        samples = [Sample(f"s{shard:02d}i{i:02d}", Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                          f"shard {shard}") for i in range(size)]
        write_shards(samples, root, shard_size=100, image_format="png", prefix=f"{shard:03d}-")
    return root


def _all_keys() -> set[str]:
    return {f"s{shard:02d}i{i:02d}" for shard, size in enumerate(SHARD_SIZES) for i in range(size)}


def _loader(root, rank, **kw):
    kw = {"batch_size": BATCH, "resolution": 8, "world_size": 2, "num_workers": 2, "seed": 5, **kw}
    return ShardLoader(root, rank=rank, **kw)


def _expected_batches(epoch: int, seed: int = 5) -> list[int]:
    """The documented rule, recomputed here from assign_shards: per rank, sum over workers of floor(n / B)."""
    urls = [f"{i:03d}" for i in range(len(SHARD_SIZES))]
    per_rank = []
    for rank in range(2):
        batches = 0
        for worker in range(2):
            shards = assign_shards(urls, rank, 2, worker, 2, epoch, seed, shuffle=True)
            batches += sum(SHARD_SIZES[int(u)] for u in shards) // BATCH
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_assign_shards_is_a_partition(world_size, num_workers):
    urls = [f"u{i}" for i in range(23)]
    for epoch in range(3):
        parts = [assign_shards(urls, r, world_size, w, num_workers, epoch, seed=1, shuffle=True)
                 for r in range(world_size) for w in range(num_workers)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    orders = {tuple(assign_shards(urls, 0, 1, 0, 1, epoch, 1, True)) for epoch in range(4)}
    assert len(orders) == 4  # every epoch permutes the shards
    assert assign_shards(urls, 0, 1, 0, 1, 0, 1, shuffle=False) == urls


def test_epoch_mode_two_ranks_two_workers(shard_dir):
    """Whole shards per reader (split="shard"): ranks run the minimum of their full batches; the rest is left out."""
    for epoch in (0, 1):
        per_rank_keys, lengths = [], []
        for rank in (0, 1):
            loader = _loader(shard_dir, rank, split="shard")
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(len(b["key"]) == BATCH for b in batches)
            assert sum(b["skips"]["padded_batches"] for b in batches) == 0
            lengths.append((len(loader), len(batches)))
            per_rank_keys.append([k for b in batches for k in b["key"]])
        expected = _expected_batches(epoch)
        n = min(expected)
        assert expected[0] != expected[1] or epoch == 1  # the fixture makes ranks unequal in epoch 0
        assert lengths == [(n, n), (n, n)]  # same number of batches on both ranks
        k0, k1 = per_rank_keys
        assert len(k0) == len(set(k0)) and len(k1) == len(set(k1))  # no duplicates within a rank
        assert not set(k0) & set(k1)  # disjoint across ranks
        assert set(k0) | set(k1) <= _all_keys()
        dropped = len(_all_keys()) - len(set(k0) | set(k1))
        assert dropped == sum(SHARD_SIZES) - 2 * n * BATCH


def test_epochs_permute_shards(shard_dir):
    firsts = []
    for epoch in range(3):
        loader = _loader(shard_dir, 0, world_size=1, num_workers=2)
        loader.set_epoch(epoch)
        batches = list(itertools.islice(loader, 2))
        firsts.append(tuple(k[:3] for b in batches for k in b["key"]))  # shard ids of the first batches
    assert len(set(firsts)) > 1


def test_too_few_shards_for_ranks_times_workers(shard_dir):
    """Whole shards cannot feed more readers than there are shards; samples can (the default with few shards)."""
    few = [str(p) for p in sorted(shard_dir.glob("*.tar"))[:3]]
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot be split over 2 rank\(s\) x 2 worker\(s\)"):
        _loader(few, 0, split="shard")
    with pytest.raises(ValueError, match="rank"):
        _loader(few, 2)
    ranks = [list(_loader(few, rank)) for rank in (0, 1)]  # 24 samples over 4 readers: 2 batches of 3 each
    keys = [k for batches in ranks for b in batches for k in b["key"]]
    assert [len(b) for b in ranks] == [4, 4] and len(keys) == len(set(keys)) == 24


def test_sample_split_leaves_out_less_than_shard_split_with_few_shards(shard_dir):
    """What an epoch delivers with several ranks (README): every rank runs the same number of full batches, no sample
    twice; with whole shards (2.5 per reader here) the ranks' totals differ by up to a shard and the larger rank's
    surplus is left out; dealing samples (index i to reader i mod readers) leaves at most a partial batch per
    reader. Either way the left-out samples are counted on each rank's last batch."""
    left_out = {}
    for split in ("shard", "sample"):
        keys, counted = [], 0
        for rank in (0, 1):
            batches = list(_loader(shard_dir, rank, split=split))
            keys += [k for b in batches for k in b["key"]]
            counted += sum(b["skips"]["left_out"] + b["skips"]["unbatched"] for b in batches)
        assert len(keys) == len(set(keys)) and set(keys) <= _all_keys()
        left_out[split] = len(_all_keys()) - len(keys)
        assert counted == left_out[split]  # delivered + counted = the samples the shards hold
    assert left_out["sample"] <= 4 * (BATCH - 1) and left_out["sample"] < left_out["shard"]


def test_resampled_mode_fixed_length_and_distinct_streams(shard_dir):
    streams = {}
    for rank in (0, 1):
        loader = _loader(shard_dir, rank, mode="resampled", batches_per_epoch=6, shuffle_buffer=0)
        assert len(loader) == 6
        batches = list(loader)
        assert len(batches) == 6
        streams[rank] = [tuple(b["key"]) for b in batches]
    assert streams[0] != streams[1]
    for rank in (0, 1):  # the DataLoader alternates workers: even batches from worker 0, odd from worker 1
        assert streams[rank][0::2] != streams[rank][1::2]
    again = [tuple(b["key"]) for b in _loader(shard_dir, 0, mode="resampled", batches_per_epoch=6,
                                               shuffle_buffer=0)]
    assert again == streams[0]  # reproducible from the one seed
    epoch1 = _loader(shard_dir, 0, mode="resampled", batches_per_epoch=6, shuffle_buffer=0)
    epoch1.set_epoch(1)
    assert [tuple(b["key"]) for b in epoch1] != streams[0]
    # With replacement: over enough batches some shard is drawn more than once.
    long = _loader(shard_dir, 0, mode="resampled", batches_per_epoch=40, num_workers=0, shuffle_buffer=0)
    keys = Counter(k for b in long for k in b["key"])
    assert max(keys.values()) > 1
    with pytest.raises(ValueError, match="batches_per_epoch"):
        _loader(shard_dir, 0, mode="resampled")
