"""The evaluation loops shared by `scripts/evaluate.py` and the training callback: real images and captions from
validation shards, reference statistics (computed or loaded), then FID / KID / CLIP score of a text-to-image
pipeline, or PSNR / SSIM / LPIPS / rFID of an autoencoder. Work is split over ranks (`distributed.py`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.data.webdataset import ShardLoader
from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.distributed import gather_rows, rank_and_world, sum_over_ranks
from ldm.evaluation.features import FeatureExtractor
from ldm.evaluation.metrics import (
    FeatureStats,
    check_samples,
    frechet_distance,
    kernel_distance,
    reconstruction_scores,
)
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.utils.logging import get_logger

log = get_logger(__name__)
GENERATION_METRICS = ("fid", "kid", "clip_score")
RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "rfid")


@dataclass
class ValidationSet:
    """This rank's share of the first `num_samples` validation samples: global indices and captions, and the
    real images' features when they were extracted while reading."""

    num_samples: int
    indices: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)


def check_metrics(metrics: Sequence[str], allowed: Sequence[str], stage: str) -> list[str]:
    unknown = [m for m in metrics if m not in allowed]
    if unknown or not metrics:
        raise ValueError(f"metrics for a {stage} checkpoint must be a non-empty list of {list(allowed)}, "
                         f"got {list(metrics)}")
    return list(metrics)


def validation_batches(shards: str | Sequence[str], *, num_samples: int, resolution: int, batch_size: int
                       ) -> Iterator[tuple[list[int], Tensor, list[str]]]:
    """(global indices, images (B, 3, H, W) in [-1, 1], captions) of this rank's share of the first `num_samples`
    samples of `shards`, read in order (no shuffle, centre crop, no flip); every rank reads the same stream."""
    rank, world = rank_and_world()
    check_samples(num_samples, "Evaluation", "samples (num_samples)")
    if num_samples < world:
        raise ValueError(f"num_samples={num_samples} is smaller than the {world} ranks: every rank needs a sample")
    loader = ShardLoader(shards, batch_size=batch_size, resolution=resolution, mode="epoch", num_workers=0,
                         shuffle=False, shuffle_buffer=0, drop_last=False, crop="center", flip=False)
    seen = 0
    for batch in loader:
        take = [k for k in range(len(batch["caption"])) if seen + k < num_samples and (seen + k) % world == rank]
        if take:
            yield [seen + k for k in take], batch["image"][take], [batch["caption"][k] for k in take]
        seen += len(batch["caption"])
        if seen >= num_samples:
            return
    raise ValueError(f"the validation shards {shards!r} hold only {seen} usable samples, fewer than "
                     f"num_samples={num_samples}: lower num_samples or pass more shards.")


@torch.no_grad()
def read_validation(shards: str | Sequence[str], *, num_samples: int, resolution: int, batch_size: int,
                    features: FeatureExtractor | None = None) -> ValidationSet:
    """Captions (and, given an extractor, real-image features) of this rank's share of the validation set."""
    out = ValidationSet(num_samples)
    for indices, images, captions in validation_batches(shards, num_samples=num_samples, resolution=resolution,
                                                        batch_size=batch_size):
        out.indices += indices
        out.captions += captions
        if features is not None:
            out.features.append(features(images))
    return out


def reference_statistics(real: ValidationSet, features: FeatureExtractor, resolution: int,
                         path: str | Path | None = None, keep_features: bool = True) -> FeatureStats:
    """Statistics of the real images: loaded from `path` when that file exists (and checked to match this
    extractor and resolution), else gathered from `real` over all ranks and, given `path`, saved there."""
    if path is not None and Path(path).is_file():
        stats = FeatureStats.load(path)
        stats.check_compatible(features.name, resolution, f"the reference statistics in {path}")
        log.info(f"Reference statistics: {path} ({stats.num_samples} images, {stats.extractor})")
        return stats
    if not real.features:
        raise ValueError("no real-image features to compute reference statistics from (read_validation was "
                         "called without a feature extractor)")
    stats = FeatureStats.from_features(gather_rows(torch.cat(real.features), real.num_samples), features.name,
                                       resolution, keep_features)
    if path is not None and rank_and_world()[0] == 0:
        stats.save(path)
        log.info(f"Saved reference statistics of {stats.num_samples} images to {path}")
    return stats


@torch.no_grad()
def generation_metrics(pipeline: LatentDiffusionPipeline, real: ValidationSet, reference: FeatureStats | None, *,
                       metrics: Sequence[str], features: FeatureExtractor | None = None,
                       clip_score: CLIPScore | None = None, seed: int = 0, batch_size: int = 16,
                       kid_subset_size: int | None = None, kid_subsets: int = 100, **sample_options: Any
                       ) -> dict[str, float]:
    """Generate one image per validation caption (seed + global index, so results do not depend on the batch
    size or the number of ranks) and score them; `sample_options` go to `pipeline.generate` (guidance, ...)."""
    check_metrics(metrics, GENERATION_METRICS, "stage-2")
    if ("fid" in metrics or "kid" in metrics) and (features is None or reference is None):
        raise ValueError("FID and KID need a feature extractor and reference statistics")
    if "kid" in metrics and reference is not None and reference.features is None:
        raise ValueError("KID needs the real images' features, and these reference statistics hold only their mean "
                         "and covariance (saved with keep_features=false): drop kid from metrics or recompute them.")
    if "clip_score" in metrics and clip_score is None:
        raise ValueError("clip_score needs a CLIPScore model")
    fake, scores, failed = [], [], 0
    # Every rank runs as many batches as the busiest one: a sharded (FSDP) UNet gathers its weights in each
    # forward, which every rank must join; a rank out of samples generates one throw-away image.
    num_batches = math.ceil(math.ceil(real.num_samples / rank_and_world()[1]) / batch_size)
    for start in range(0, num_batches * batch_size, batch_size):
        captions = real.captions[start:start + batch_size]
        if not captions:
            pipeline.generate(real.captions[:1], [seed], **sample_options)
            continue
        seeds = [seed + i for i in real.indices[start:start + batch_size]]
        result = pipeline.generate(captions, seeds, **sample_options)
        failed += int((~result.finite).sum())
        if features is not None and ("fid" in metrics or "kid" in metrics):
            fake.append(features(result.images))
        if "clip_score" in metrics:
            scores.append(clip_score(result.images, captions))
    failed = sum_over_ranks(failed)
    if failed:
        raise FloatingPointError(f"{failed} of {real.num_samples} generated images contain NaN/Inf: the metrics would "
                                 "be meaningless. Try precision=fp32, or check the checkpoint for NaN weights.")
    results: dict[str, float] = {}
    if fake:
        fake_features = gather_rows(torch.cat(fake), real.num_samples)
        resolution = int(pipeline.default_size if sample_options.get("height") is None else sample_options["height"])
        if "fid" in metrics:
            reference.check_compatible(features.name, resolution)
            results["fid"] = frechet_distance(reference, FeatureStats.from_features(fake_features, features.name,
                                                                                     resolution, keep_features=False))
        if "kid" in metrics:
            results["kid_mean"], results["kid_std"] = kernel_distance(
                reference.features, fake_features, subset_size=kid_subset_size, subsets=kid_subsets, seed=seed)
    if scores:
        results["clip_score"] = float(gather_rows(torch.cat(scores), real.num_samples).mean())
    return results


@torch.no_grad()
def reconstruction_metrics(autoencoder: AutoencoderKL, batches: Iterator[tuple[list[int], Tensor, list[str]]], *,
                           num_samples: int, resolution: int, metrics: Sequence[str],
                           features: FeatureExtractor | None = None, lpips: nn.Module | None = None
                           ) -> dict[str, float]:
    """Reconstruct each image through the posterior mean and compare: mean PSNR/SSIM/LPIPS, and rFID (the FID of
    the reconstructions against the inputs)."""
    check_metrics(metrics, RECONSTRUCTION_METRICS, "stage-1")
    if "rfid" in metrics and features is None:
        raise ValueError("rfid needs a feature extractor")
    if "lpips" in metrics and lpips is None:
        raise ValueError("lpips needs an LPIPS model")
    device = next(autoencoder.parameters()).device
    per_image: dict[str, list[Tensor]] = {}
    real, fake = [], []
    for _, images, _ in batches:
        images = images.to(device)
        reconstructions = autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)
        if not bool(reconstructions.isfinite().all()):
            raise FloatingPointError("the autoencoder's reconstructions contain NaN/Inf; check the checkpoint")
        scores = reconstruction_scores(images, reconstructions, lpips if "lpips" in metrics else None)
        for name, value in scores.items():
            per_image.setdefault(name, []).append(value)
        if "rfid" in metrics:
            real.append(features(images))
            fake.append(features(reconstructions))
    results = {name: float(gather_rows(torch.cat(per_image[name]), num_samples).mean())
               for name in ("psnr", "ssim", "lpips") if name in metrics}
    if "rfid" in metrics:
        stats = [FeatureStats.from_features(gather_rows(torch.cat(f), num_samples), features.name, resolution, False)
                 for f in (real, fake)]
        results["rfid"] = frechet_distance(*stats)
    return results
