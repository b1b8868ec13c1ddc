"""`python train.py experiment=...`: compose the Hydra config, build every object from `_target_`, fit.

The one place where configs become objects (`build`); everything it builds takes plain typed arguments.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ldm.conf import CONF_DIR
from ldm.utils.checkpoint import resolve_ckpt_path
from ldm.utils.hydra_ddp import end_distributed_job, pin_sweep_job_for_ddp
from ldm.utils.logging import get_logger
from ldm.utils.wandb_mode import ensure_wandb_mode

log = get_logger(__name__)
# Lightning warnings that say nothing about an ldm run: checkpoints are meant to hold the post-step state
# (their global_step counts applied steps), and the pytree notice is internal to Lightning.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
# The frozen autoencoder and text encoder are in eval mode by design (no dropout, no norm-statistics updates).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class _DropTips(logging.Filter):
    """Lightning's advertisement for its hosted logger, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


@dataclass
class Built:
    """Everything a run needs, built from one config."""

    datamodule: L.LightningDataModule
    model: L.LightningModule
    trainer: L.Trainer
    callbacks: list[L.Callback] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` node of a name->config mapping (callbacks, loggers), skipping nulls."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build(cfg: DictConfig) -> Built:
    """Config -> objects. Nothing else in ldm calls `instantiate`."""
    if cfg.get("logger") and any("wandb" in str(node.get("_target_", "")).lower() for node in cfg.logger.values()
                                 if node is not None):
        ensure_wandb_mode()
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    if hasattr(model, "run_config"):  # stage 2 writes it into every checkpoint: sampling needs nothing beside it
        model.run_config = {"model": OmegaConf.to_container(cfg.model, resolve=True),
                            "data": {"resolution": OmegaConf.select(cfg, "data.resolution")}}
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Built(datamodule, model, trainer, callbacks, loggers)


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def _save_resolved_config(cfg: DictConfig, built: Built) -> None:
    """The resolved config beside the checkpoints, and in every logger's hyperparameters."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if built.trainer.is_global_zero:
        out = _output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), out / "config_resolved.yaml")
    for logger in built.loggers:
        logger.log_hyperparams(resolved)


def train(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, (resume,) fit; return the final logged metrics for sweeps."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True)  # per-rank and per-worker seeds are derived from this one
    built = build(cfg)
    runs_root = Path(cfg.paths.runs_root) if cfg.paths.get("runs_root") else None
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), _output_dir(cfg), runs_root)
    if ckpt_path:
        log.info(f"Resuming from {ckpt_path}")
    try:
        _save_resolved_config(cfg, built)
        built.trainer.fit(built.model, datamodule=built.datamodule, ckpt_path=ckpt_path)
    except BaseException:
        for logger in built.loggers:  # fit finalizes them itself; this covers a failure before it started
            logger.finalize("failed")
        raise
    metrics = {k: float(v) for k, v in built.trainer.callback_metrics.items() if v.numel() == 1}
    if built.trainer.is_global_zero:
        log.info(f"Outputs and checkpoints: {_output_dir(cfg)}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.initialized() and cfg.get("print_config", True) and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        from ldm.utils.print_config import print_config

        print_config(cfg)
    pin_sweep_job_for_ddp()
    try:
        metrics = train(cfg)
    finally:
        end_distributed_job()
    metric_name = cfg.get("optimized_metric")
    return metrics.get(metric_name) if metric_name else None


if __name__ == "__main__":
    main()
