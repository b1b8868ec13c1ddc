"""Aspect-ratio buckets: the bucket set, the cover-and-crop geometry against the centre square, the loader on
keep-ratio shards of real photographs (one size per batch, every sample once or counted, equal epochs on every rank,
exact replays), bucketed latent caches, and stage 2 trained on them through train.py."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_train
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from ldm.data.buckets import check_buckets, cover_box, kept_fraction, make_buckets, nearest_bucket
from ldm.data.shards import Sample, write_shards
from ldm.data.transforms import square_box
from ldm.data.webdataset import SKIP_CAUSES, ShardLoader

RATIOS = (0.5, 0.6, 0.75, 1.0, 1.33, 1.6, 2.0, 2.4)  # width / height, as img2dataset's keep_ratio leaves them


@pytest.mark.parametrize("resolution,multiple", [(256, 64), (512, 64), (1024, 64), (32, 8), (256, 32)])
def test_bucket_sets(resolution: int, multiple: int) -> None:
    buckets = make_buckets(resolution, multiple, max_ratio=2.0)
    assert (resolution, resolution) in buckets and len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0 and (w, h) in buckets  # symmetric
        assert h * w <= resolution**2 and max(h, w) / min(h, w) <= 2.0
        assert h * w > resolution**2 * (1 - 2 * multiple / min(h, w))  # the largest area the multiple allows
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)


def test_bad_bucket_lists_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="bucket 36x32: both sides must be multiples of 8"):
        check_buckets([[32, 32], [36, 32]], 8)
    with pytest.raises(ValueError, match="listed twice"):
        check_buckets([[32, 32], [32, 32]], 8)
    with pytest.raises(ValueError, match="need resolution >= multiple"):
        make_buckets(32, 64)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.62, 0.8, 1.0, 1.25, 1.7, 2.0, 3.0])
def test_cover_box_crops_the_least_and_never_less_than_the_square(ratio: float) -> None:
    """The crop has the bucket's aspect ratio, fits the image, touches two opposite sides (nothing more could be
    kept), and keeps at least the centre square's pixels."""
    buckets = make_buckets(256, 32)
    width, height = round(600 * math.sqrt(ratio)), round(600 / math.sqrt(ratio))
    bucket = nearest_bucket(width, height, buckets)
    left, top, right, bottom = cover_box(width, height, bucket, "random", random.Random(0))
    assert 0 <= left and 0 <= top and right <= width + 1e-9 and bottom <= height + 1e-9
    assert (right - left) / (bottom - top) == pytest.approx(bucket[1] / bucket[0], rel=1e-9)
    assert math.isclose(right - left, width) or math.isclose(bottom - top, height)
    square = square_box((width, height), "center")
    assert kept_fraction(width, height, bucket) >= (square[2] - square[0]) ** 2 / (width * height) - 1e-12


def photos() -> list[tuple[str, np.ndarray]]:
    images = [("an astronaut", skdata.astronaut()), ("a cup of coffee", skdata.coffee()), ("a cat", skdata.chelsea()),
              ("a rocket", skdata.rocket())]
    china, flower = load_sample_images().images
    return images + [("a temple", china), ("a flower", flower)]


def keep_ratio_samples(n: int, short_side: int = 40, seed: int = 0) -> list[Sample]:
    """Crops of real photographs at varied aspect ratios, resized to a short side of `short_side`, kept whole."""
    rng, out, sources = np.random.default_rng(seed), [], photos()
    for i in range(n):
        caption, image = sources[i % len(sources)]
        ratio = RATIOS[rng.integers(len(RATIOS))]
        h, w = image.shape[:2]
        ch, cw = (h, min(w, round(h * ratio))) if ratio * h <= w else (min(h, round(w / ratio)), w)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(image[top:top + ch, left:left + cw]).convert("RGB")
        scale = short_side / min(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
        out.append(Sample(f"{i:05d}", crop, caption))
    return out


@pytest.fixture(scope="module")
def keep_ratio_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keep_ratio")
    write_shards(keep_ratio_samples(192), root / "train", shard_size=16, image_format="jpg")
    write_shards(keep_ratio_samples(32, seed=1), root / "val", shard_size=16, image_format="jpg")
    return root


BUCKETS = make_buckets(32, 8)  # (40, 24), (32, 32), (24, 40)


def loader(root: Path, **kwargs) -> ShardLoader:
    return ShardLoader(root / "train", batch_size=8, resolution=32, buckets=BUCKETS, **{"num_workers": 0, **kwargs})


def test_one_bucket_per_batch_and_every_sample_once_or_counted(keep_ratio_shards: Path) -> None:
    batches = list(loader(keep_ratio_shards, num_workers=2))
    sizes = {tuple(b["image"].shape[-2:]) for b in batches}
    assert sizes <= set(BUCKETS) and len(sizes) == 3  # all three buckets occur, each batch one of them
    keys = [k for b in batches for k in b["key"]]
    left_out = sum(b["skips"]["left_out"] for b in batches)
    assert len(keys) == len(set(keys)) == 160  # len(): the batches any spread over the buckets fills
    assert len(keys) + left_out == 192  # the rest is counted on the epoch's last batch, not lost silently
    assert sum(b["skips"][c] for b in batches for c in SKIP_CAUSES if c != "left_out") == 0


def test_the_epoch_length_holds_for_any_spread_over_buckets(keep_ratio_shards: Path) -> None:
    """len() is the guaranteed number (worker_batches); one rank stops there, however the buckets filled."""
    ordinary = ShardLoader(keep_ratio_shards / "train", batch_size=8, resolution=32, num_workers=2)
    bucketed = loader(keep_ratio_shards, num_workers=2)
    assert len(bucketed) == 2 * math.ceil((96 - 3 * 7) / 8) == 20 and len(ordinary) == 24
    assert len(list(bucketed)) == 20


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_run_equal_epochs_without_repeats(keep_ratio_shards: Path, world_size: int) -> None:
    ranks = [loader(keep_ratio_shards, rank=r, world_size=world_size, num_workers=1) for r in range(world_size)]
    epochs = [list(r) for r in ranks]
    assert len({len(e) for e in epochs}) == 1 and len(epochs[0]) == len(ranks[0]) > 0
    keys = [k for e in epochs for b in e for k in b["key"]]
    assert len(keys) == len(set(keys))  # no sample twice in an epoch, across ranks
    assert all(b["skips"]["padded_batches"] == 0 for e in epochs for b in e)


def test_bucketed_batches_replay_exactly(keep_ratio_shards: Path) -> None:
    """Same seed and epoch, same batches, bit for bit (what exact resume replays); another epoch, others."""
    def run(epoch: int) -> list[tuple[list[str], torch.Tensor]]:
        shard_loader = loader(keep_ratio_shards, num_workers=2)
        shard_loader.set_epoch(epoch)
        return [(b["key"], b["image"]) for b in shard_loader]

    a, b, c = run(0), run(0), run(1)
    assert [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert [k for k, _ in a] != [k for k, _ in c]


def test_buckets_keep_more_of_each_photograph(keep_ratio_shards: Path) -> None:
    """The fraction of each image's pixels that reaches the model: buckets vs the centre square."""
    samples = keep_ratio_samples(192)
    square = [min(s.image.size) ** 2 / (s.image.width * s.image.height) for s in samples]
    bucketed = [kept_fraction(s.image.width, s.image.height, nearest_bucket(*s.image.size, BUCKETS)) for s in samples]
    assert all(b >= q - 1e-12 for b, q in zip(bucketed, square))
    assert np.mean(bucketed) > np.mean(square) + 0.15  # measured: 0.85 vs 0.64 on these crops


# ------------------------------------------------------------------------------------------------ stage 2
@pytest.fixture(scope="module")
def bucketed_cache(keep_ratio_shards: Path, latent_parts: dict[str, Path], tmp_path_factory) -> Path:
    from ldm.data.latent_cache import cache_latents
    from ldm.models.autoencoder.export import load_autoencoder

    out = tmp_path_factory.mktemp("bucketed_latents")
    autoencoder = load_autoencoder(latent_parts["export"])
    cache_latents(autoencoder, str(keep_ratio_shards / "train"), out / "train", resolution=32, buckets=BUCKETS,
                  progress=False)
    cache_latents(autoencoder, str(keep_ratio_shards / "val"), out / "val", resolution=32, progress=False)
    return out


@pytest.mark.slow  # a tiny stage-1 run for its autoencoder
def test_a_bucketed_latent_cache_keeps_each_bucket(bucketed_cache: Path) -> None:
    from ldm.data.latent_cache import read_card

    assert read_card(bucketed_cache / "train")["buckets"] == [list(b) for b in BUCKETS]
    shard_loader = ShardLoader(bucketed_cache / "train", batch_size=8, resolution=32, latents=True, num_workers=0,
                               num_buckets=3)
    batches = list(shard_loader)
    shapes = {tuple(b["latent"].shape[-2:]) for b in batches}
    assert shapes == {(h // 4, w // 4) for h, w in BUCKETS}  # the tiny autoencoder's factor 4
    assert len(batches) == len(shard_loader)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["unet_tiny", "dit_tiny"])
def test_stage2_trains_on_bucketed_latents(bucketed_cache: Path, latent_parts: dict[str, Path], tmp_path: Path,
                                           backbone: str) -> None:
    run_dir = tmp_path / backbone
    run_train("experiment=ldm_tiny", f"model/backbone={backbone}", "data=latents", f"data.root={bucketed_cache}",
              f"model.autoencoder.path={latent_parts['export']}", f"hydra.run.dir={run_dir}",
              f"paths.log_dir={tmp_path}", "data.batch_size=8", "trainer.max_steps=6", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "callbacks.sample_images.every_n_steps=6",
              "callbacks.sample_images.images_per_prompt=1", "callbacks.sample_images.sampling.steps=2",
              'callbacks.sample_images.aspects=["5:3"]', "logger=csv", "num_threads=1")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    square = Image.open(run_dir / "images" / "samples_00000006.png")
    wide = Image.open(run_dir / "images" / "samples_5x3_00000006.png")  # the same grid of 24x40 samples
    assert wide.width > square.width and wide.height < square.height
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_with_buckets(bucketed_cache: Path, latent_parts: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """test_resume's SIGKILL check on a bucketed cache: 10 batches of mixed sizes per epoch, killed mid-run, resumed
    from the last checkpoint: the same samples after the restart and the same weights, EMA and snapshots."""
    import signal

    from test_resume import STEPS, assert_same_end, keys_by_step, launch, stage2, wait_for_step

    parts = {"latents": bucketed_cache, "export": latent_parts["export"]}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_train(*stage2(straight, parts, STEPS))
    proc = launch(stage2(interrupted, parts, STEPS))
    wait_for_step(proc, interrupted, 13)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 10  # the last batch of epoch 0 (10 batches an epoch): resumed across the boundary
    run_train(*stage2(interrupted, parts, STEPS), "ckpt_path=last")
    reference, resumed = keys_by_step(straight), keys_by_step(interrupted)
    assert [resumed[s] for s in range(10, STEPS)] == [reference[s] for s in range(10, STEPS)]
    assert_same_end(straight, interrupted, "killed at 13, buckets")


@pytest.mark.slow
def test_ddp_ranks_share_a_bucketed_epoch(bucketed_cache: Path, latent_parts: dict[str, Path], tmp_path: Path) -> None:
    """Two processes (gloo): equal batch counts (no hang), mixed sizes, no sample on both ranks in an epoch."""
    run_dir = tmp_path / "ddp"
    run_train("experiment=ldm_tiny", "data=latents", f"data.root={bucketed_cache}", "trainer=ddp_cpu",
              f"model.autoencoder.path={latent_parts['export']}", f"hydra.run.dir={run_dir}",
              f"paths.log_dir={tmp_path}", "data.batch_size=8", "trainer.max_steps=8", "trainer.val_check_interval=4",
              "trainer.limit_val_batches=1", "~callbacks.sample_images", "logger=csv", "num_threads=1",
              "+callbacks.sample_log._target_=ldm.callbacks.sample_log.SampleKeyLog", nproc=2, timeout=900)
    keys = [[line.split("\t")[1].split(",") for line in (run_dir / f"keys_rank{r}.tsv").read_text().splitlines()]
            for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 8
    epoch = [k for rank in keys for batch in rank for k in batch]  # 96 samples a rank: 10 batches an epoch
    assert len(epoch) == len(set(epoch))


@pytest.mark.slow
def test_both_stages_train_on_bucketed_image_shards(keep_ratio_shards: Path, latent_parts: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """Stage 1 and stage 2 (encoding on the fly) straight from keep-ratio image shards with buckets on."""
    common = ["data=webdataset", f"data.train_shards={keep_ratio_shards}/train", f"data.val_shards={keep_ratio_shards}/val",
              "data.buckets=true", "data.bucket_multiple=8", "data.resolution=32", "data.batch_size=8",
              "data.num_workers=0", "data.min_side=8", "trainer.max_steps=4", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "logger=csv", "num_threads=1", f"paths.log_dir={tmp_path}"]
    run_train("experiment=autoencoder_tiny", f"hydra.run.dir={tmp_path / 'ae'}", "callbacks.latent_stats.num_batches=2",
              "model.loss.disc_start=2", *common)
    run_train("experiment=ldm_tiny", f"model.autoencoder.path={latent_parts['export']}",
              f"hydra.run.dir={tmp_path / 'ldm'}", "~callbacks.sample_images", *common)
    for stage in ("ae", "ldm"):
        ckpt = torch.load(tmp_path / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 4
