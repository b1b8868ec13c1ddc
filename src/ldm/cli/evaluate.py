"""`python scripts/evaluate.py ckpt=PATH shards=VAL_SHARDS`: FID, KID and CLIP score of a stage-2 checkpoint at one
or more guidance scales, or PSNR, SSIM, LPIPS and rFID of a stage-1 checkpoint; writes a json and logs to W&B.
Under torchrun every rank samples its share of the validation captions."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import hydra
import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.cli.posthoc_ema import snapshot_folder
from ldm.conf import CONF_DIR
from ldm.evaluation.distributed import init_from_env, rank_and_world
from ldm.evaluation.runner import (
    GENERATION_METRICS,
    RECONSTRUCTION_METRICS,
    check_metrics,
    generation_metrics,
    read_validation,
    reconstruction_metrics,
    reference_statistics,
    validation_batches,
)
from ldm.inference.loading import EXPORT_CARD, load_pipeline
from ldm.inference.sampling_options import SamplingOptions
from ldm.models.autoencoder.export import CARD, WEIGHTS, load_autoencoder, trained_resolution
from ldm.posthoc_ema import list_snapshots, reconstruct, sigma_rel_to_gamma
from ldm.utils.checkpoint import read_checkpoint
from ldm.utils.hub_weights import WeightsUnavailable
from ldm.utils.logging import get_logger
from ldm.utils.wandb_mode import ensure_wandb_mode

log = get_logger(__name__)
Stage = Literal["autoencoder", "diffusion"]
SCORERS = {"features": ("fid", "kid", "rfid"), "clip": ("clip_score",), "lpips": ("lpips",)}  # model -> metrics


def checkpoint_stage(path: str | Path) -> Stage:
    """"diffusion" for a stage-2 .ckpt or pipeline export, "autoencoder" for a stage-1 .ckpt or export."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt={path} does not exist: pass a training checkpoint (<run>/checkpoints/last.ckpt) "
                                "or an export folder of either stage.")
    if path.is_dir():
        if (path / EXPORT_CARD).is_file():
            return "diffusion"
        if (path / CARD).is_file():
            return "autoencoder"
        raise ValueError(f"{path} is neither a pipeline export (no {EXPORT_CARD}) nor an autoencoder export (no {CARD})")
    if path.name in (CARD, WEIGHTS):
        return "autoencoder"
    stage = read_checkpoint(path, mmap=True).get("ldm", {}).get("stage")
    if stage not in ("autoencoder", "diffusion"):
        raise ValueError(f"{path} is not an ldm checkpoint (ckpt['ldm']['stage'] = {stage!r}); expected a checkpoint "
                         "written by train.py, or an export folder.")
    return stage


def _list(value: Any) -> list[Any]:
    return list(OmegaConf.to_object(value)) if isinstance(value, ListConfig) else [value]


def select_metrics(cfg: DictConfig, stage: Stage) -> list[str]:
    """`metrics=`, or when null the stage's metrics less `skip_metrics`."""
    allowed = GENERATION_METRICS if stage == "diffusion" else RECONSTRUCTION_METRICS
    skip = set(cfg.skip_metrics or ())
    if skip - {*GENERATION_METRICS, *RECONSTRUCTION_METRICS}:
        raise ValueError(f"skip_metrics={sorted(skip)} may only name {[*GENERATION_METRICS, *RECONSTRUCTION_METRICS]}")
    chosen = _list(cfg.metrics) if cfg.metrics is not None else [m for m in allowed if m not in skip]
    return check_metrics(chosen, allowed, stage)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt`; returns the record written to `cfg.out` (on rank 0)."""
    created_group = not (dist.is_available() and dist.is_initialized())
    device = init_from_env(cfg.device)
    try:
        record = _evaluate(cfg, device)
    finally:
        if created_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return record


def _evaluate(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    rank, world = rank_and_world()
    stage = checkpoint_stage(cfg.ckpt)
    metrics = select_metrics(cfg, stage)
    resolution = cfg.resolution or (trained_resolution(cfg.ckpt) if stage == "autoencoder" else None)
    if stage == "autoencoder" and not resolution:
        raise ValueError("resolution= is required for a stage-1 checkpoint that does not record its training "
                         f"resolution (an export whose {CARD} predates the field, or a .ckpt without the data "
                         "module's hyperparameters): the size validation images are centre-cropped to (the "
                         "autoencoder's training resolution).")
    # Start-up: the sampling settings and every weight file the metrics need, before a checkpoint is loaded.
    sampling = ([SamplingOptions.from_config(cfg, guidance=float(g)) for g in _list(cfg.guidance)]
                if stage == "diffusion" else [])
    posthoc = posthoc_lengths(cfg, stage)
    scorers = build_scorers(cfg, metrics, device)
    features, clip_score, lpips = scorers["features"], scorers["clip"], scorers["lpips"]

    start = time.time()
    record: dict[str, Any] = {"ckpt": str(Path(cfg.ckpt).resolve()), "stage": stage, "metrics": metrics,
                              "num_samples": cfg.num_samples, "shards": _list(cfg.shards), "world_size": world,
                              "features": features.name if features is not None else None}
    if stage == "diffusion":
        record |= _evaluate_pipeline(cfg, device, metrics, features, clip_score, sampling, posthoc)
    else:
        autoencoder = load_autoencoder(cfg.ckpt).eval().requires_grad_(False).to(device)
        batches = validation_batches(cfg.shards, num_samples=cfg.num_samples, resolution=resolution,
                                     batch_size=cfg.batch_size)
        scores = reconstruction_metrics(autoencoder, batches, num_samples=cfg.num_samples, resolution=resolution,
                                        metrics=metrics, features=features, lpips=lpips)
        record |= {"resolution": resolution, "results": [scores]}
    record["seconds"] = round(time.time() - start, 1)
    record = _nan_to_null(record)  # JSON has no NaN: an undefined number (kid_std from one subset) is null
    if rank == 0:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        log.info(f"Wrote {out}")
        if cfg.wandb.enabled:
            _log_wandb(cfg, record, out.parent)
    return record


def build_scorers(cfg: DictConfig, metrics: list[str], device: torch.device) -> dict[str, Any]:
    """The feature extractor, CLIP model and LPIPS that `metrics` need (None where none needs it), built before any
    data is read. Weights that are neither a local file, nor cached, nor downloadable are collected over all three
    and reported in one error, each with the config key (and environment variable) that takes a local file."""
    scorers: dict[str, Any] = {}
    missing: list[tuple[list[str], WeightsUnavailable]] = []
    for name, users in SCORERS.items():
        users = [m for m in users if m in metrics]
        scorers[name] = None
        if not users:
            continue
        try:
            scorers[name] = _build_scorer(cfg, name).to(device)
        except (WeightsUnavailable, InstantiationException) as error:
            cause = error.__cause__ if isinstance(error, InstantiationException) else error
            if not isinstance(cause, WeightsUnavailable):
                raise
            missing.append((users, cause))
    if missing:
        items = "\n".join(f"  {i}. {', '.join(users)} (local file: {' or '.join(_sources(cfg, error.keys))}): {error}"
                          for i, (users, error) in enumerate(missing, 1))
        raise WeightsUnavailable(f"{len(missing)} of the weights the chosen metrics need can be neither found nor "
                                 f"downloaded (checked before reading any data):\n{items}\nFor a smoke run "
                                 "without any weights: preset=offline (random features, a tiny random CLIP, no "
                                 "LPIPS); or leave those metrics out with metrics=[...].",
                                 [key for _, error in missing for key in error.keys])
    return scorers


def _build_scorer(cfg: DictConfig, name: str) -> Any:
    if name == "lpips":
        from ldm.models.autoencoder.lpips import LPIPS

        return LPIPS(vgg_weights=cfg.lpips_weights, config_key="lpips_weights")
    return hydra.utils.instantiate(cfg[name])


def _sources(cfg: DictConfig, keys: list[str]) -> list[str]:
    """`key=`, plus `ENV_VAR=` when the config reads the key from an environment variable (`${oc.env:...}`)."""
    out = []
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raw = OmegaConf.to_container(node, resolve=False).get(leaf) if isinstance(node, DictConfig) else None
        env = re.match(r"\$\{oc\.env:(\w+)", raw) if isinstance(raw, str) else None
        out.append(f"{key}=" + (f" or {env[1]}=" if env else ""))
    return out


def _nan_to_null(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value


def posthoc_lengths(cfg: DictConfig, stage: Stage) -> list[float | None]:
    """`posthoc_sigma_rel` as a list ([None]: the checkpoint's own weights), checked with its snapshots at start-up."""
    if cfg.posthoc_sigma_rel is None:
        return [None]
    if stage != "diffusion" or Path(cfg.ckpt).is_dir():
        raise ValueError("posthoc_sigma_rel= needs a stage-2 training checkpoint (<run>/checkpoints/last.ckpt) whose "
                         "run tracked a post-hoc EMA (+callbacks=posthoc_ema), not an export folder")
    lengths = [float(s) for s in _list(cfg.posthoc_sigma_rel)]
    for length in lengths:
        sigma_rel_to_gamma(length)  # range check
    list_snapshots(snapshot_folder(cfg.ckpt, cfg.posthoc_snapshots))  # the folder exists and holds snapshots
    return lengths


def _evaluate_pipeline(cfg: DictConfig, device: torch.device, metrics: list[str], features: Any,
                       clip_score: Any, sampling: list[SamplingOptions], posthoc: list[float | None]
                       ) -> dict[str, Any]:
    """One result per post-hoc EMA length and guidance scale (`sampling`: the settings of each scale; `posthoc`:
    the sigma_rels to rebuild, [None] for the checkpoint's own weights)."""
    pipeline = load_pipeline(cfg.ckpt, ema=cfg.ema, config=cfg.config, autoencoder=cfg.autoencoder, device=device)
    resolution = int(cfg.resolution or pipeline.default_size)
    pipeline.check_size(resolution, resolution)
    reuse = cfg.reference is not None and Path(cfg.reference).is_file()
    needs_real = features is not None and not reuse
    real = read_validation(cfg.shards, num_samples=cfg.num_samples, resolution=resolution,
                           batch_size=cfg.batch_size, features=features if needs_real else None)
    reference = (reference_statistics(real, features, resolution, cfg.reference, cfg.keep_features)
                 if features is not None else None)
    results = []
    for sigma_rel in posthoc:
        row: dict[str, Any] = {}
        if sigma_rel is not None:
            rebuilt = reconstruct(snapshot_folder(cfg.ckpt, cfg.posthoc_snapshots), sigma_rel, cfg.posthoc_step)
            pipeline.backbone.load_state_dict(rebuilt.state_dict)
            pipeline.weights = f"posthoc_ema (sigma_rel {sigma_rel} at step {rebuilt.step})"
            row = {"sigma_rel": sigma_rel, "profile_error": rebuilt.profile_error}
        for options in sampling:
            scores = generation_metrics(pipeline, real, reference, metrics=metrics, features=features,
                                        clip_score=clip_score, seed=cfg.seed, batch_size=cfg.batch_size,
                                        kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets,
                                        height=resolution, width=resolution, **options.generate_kwargs())
            results.append({**row, "guidance": options.guidance, **scores})
            log.info(f"{pipeline.weights}, guidance {options.guidance}: "
                     + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    settings = {k: v for k, v in sampling[0].record().items() if k != "guidance"}
    return {"weights": pipeline.weights, "resolution": resolution, "seed": cfg.seed, **settings,
            "clip_model": clip_score.name if clip_score is not None else None,
            "reference": str(Path(cfg.reference).resolve()) if cfg.reference else None,
            "reference_reused": reuse, "reference_samples": reference.num_samples if reference else None,
            "results": results}


def _log_wandb(cfg: DictConfig, record: dict[str, Any], out_dir: Path) -> None:
    """One W&B run: the settings as config, one step per guidance scale, and a table for the curve."""
    ensure_wandb_mode()
    import wandb

    run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, tags=_list(cfg.wandb.tags), job_type="eval",
                     dir=str(out_dir), config={k: v for k, v in record.items() if k != "results"})
    try:
        rows = record["results"]
        for step, row in enumerate(rows):
            run.log({f"eval/{k}": v for k, v in row.items() if v is not None}, step=step)
        if len(rows) > 1:
            table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            run.log({"eval/guidance_curve": table}, step=len(rows) - 1)
            if "sigma_rel" in rows[0]:  # a post-hoc EMA sweep: each metric against the EMA length
                lines = {f"eval/ema_curve/{m}": wandb.plot.line(table, "sigma_rel", m, title=f"{m} vs EMA length")
                         for m in rows[0] if m not in ("sigma_rel", "profile_error", "guidance")}
                run.log(lines, step=len(rows) - 1)
        run.summary.update({f"eval/{k}": v for k, v in rows[-1].items() if v is not None})
    finally:
        run.finish()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
