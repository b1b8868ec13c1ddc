"""FID / KID / CLIP score during training: every N steps (and at the end) the EMA weights sample the first N
validation captions with fixed seeds, on all ranks, and `eval/*` goes to the run's loggers and `eval.jsonl`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ldm.callbacks.pipeline import SamplingCallback
from ldm.data.shards import expand_urls
from ldm.evaluation.clip_score import CLIPScore
from ldm.evaluation.features import FeatureExtractor
from ldm.evaluation.metrics import FeatureStats
from ldm.evaluation.runner import (
    GENERATION_METRICS,
    ValidationSet,
    check_metrics,
    generation_metrics,
    read_validation,
    reference_statistics,
)
from ldm.inference.sampling_options import SamplingOptions
from ldm.utils.logging import get_logger, logger_step

log = get_logger(__name__)


class EvaluateCallback(SamplingCallback):
    """Generation metrics of a stage-2 run on fixed prompts and seeds, so the curves of a sweep compare.

    Args:
        shards: validation image-text shards: the first `num_samples` captions are sampled (image i with seed
            + i) and their images are the real set.
        features: the FID/KID feature extractor, built at start-up (a missing weights file fails there).
        clip_score: the CLIP-score model; needed when `metrics` has clip_score.
        reference: an `.npz` of reference statistics to reuse, or to write at the first evaluation.
        every_n_steps: evaluate when the global step is a multiple of this; 0: only at the end of training.
        sampling: the conf/sampling/ keys (a SamplingOptions or a mapping of some of them); default 25 steps.
    """

    def __init__(self, shards: str | Sequence[str], num_samples: int = 1000, *,
                 features: FeatureExtractor | None = None, clip_score: CLIPScore | None = None,
                 metrics: Sequence[str] = ("fid", "clip_score"), every_n_steps: int = 5000, seed: int = 0,
                 sampling: SamplingOptions | Mapping[str, Any] | None = None, batch_size: int = 16,
                 reference: str | None = None,
                 kid_subset_size: int | None = None, kid_subsets: int = 100, use_ema: bool = True,
                 resolution: int | None = None) -> None:
        self.metrics = check_metrics(list(metrics), GENERATION_METRICS, "stage-2")
        if ({"fid", "kid"} & set(self.metrics)) and features is None:
            raise ValueError("EvaluateCallback: fid/kid need `features` (conf/callbacks/evaluate.yaml builds one)")
        if "clip_score" in self.metrics and clip_score is None:
            raise ValueError("EvaluateCallback: clip_score needs `clip_score` (an ldm.evaluation.clip_score.CLIPScore)")
        super().__init__(every_n_steps, sampling=sampling if sampling is not None else {"steps": 25},
                         use_ema=use_ema, resolution=resolution)
        self.shards, self.num_samples, self.seed, self.batch_size = shards, num_samples, seed, batch_size
        self.features, self.clip_score, self.reference_path = features, clip_score, reference
        self.kid = {"kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets}
        self._real: ValidationSet | None = None
        self._reference: FeatureStats | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        expand_urls(self.shards)  # a wrong path fails at start-up, not at the first evaluation

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, score and log; every rank takes part (each samples its share). Returns the metrics."""
        for module in (self.features, self.clip_score):
            if module is not None:
                module.to(pl_module.device)
        with self.pipeline(trainer, pl_module) as pipeline:
            resolution = int(pipeline.default_size)
            if self._real is None:  # the real set and its statistics: once per run
                needs_real = self.features is not None and not (
                    self.reference_path and Path(self.reference_path).is_file())
                self._real = read_validation(self.shards, num_samples=self.num_samples, resolution=resolution,
                                             batch_size=self.batch_size,
                                             features=self.features if needs_real else None)
                if self.features is not None:
                    self._reference = reference_statistics(self._real, self.features, resolution,
                                                           self.reference_path)
            scores = generation_metrics(pipeline, self._real, self._reference, metrics=self.metrics,
                                        features=self.features, clip_score=self.clip_score, seed=self.seed,
                                        batch_size=self.batch_size, height=resolution, width=resolution,
                                        **self.options, **self.kid)
        logged = {f"eval/{k}": v for k, v in scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=logger_step(trainer))
        self._write(trainer, logged)
        return scores

    @rank_zero_only
    def _write(self, trainer: L.Trainer, logged: dict[str, float]) -> None:
        log.info(f"step {trainer.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in logged.items()))
        if trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "eval.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, **logged}) + "\n")
