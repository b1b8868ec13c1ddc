"""A LoRA run's adapters out of its training checkpoint (`scripts/export_lora.py`), and adapters onto a pipeline for
sampling (`scripts/sample.py lora=<folder> lora_scale=1.0`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ldm.inference.loading import ema_state
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.models.lora import LoRA, attach_adapter, rebuild, save_adapter
from ldm.utils.checkpoint import read_checkpoint, upgrade_stage2_checkpoint


def lora_backbone(path: str | Path, ema: bool | None = None) -> tuple[nn.Module, LoRA, str]:
    """The backbone of a LoRA run with its adapters (EMA when the run kept one, unless ema=False), the run's LoRA
    settings, and which weights they are."""
    ckpt = upgrade_stage2_checkpoint(read_checkpoint(path))
    meta = ckpt.get("ldm", {})
    if meta.get("stage") != "diffusion":
        raise ValueError(f"{path} is not a stage-2 (diffusion) checkpoint of ldm.")
    if not meta.get("lora"):
        raise ValueError(f"{path} is not a LoRA run (it records no ckpt['ldm']['lora']): train with "
                         "model/lora=default, or export the whole model with scripts/export_pipeline.py.")
    averaged = ema_state(ckpt)
    if ema and averaged is None:
        raise ValueError(f"{path} holds no EMA weights; pass raw=true for the raw adapters.")
    if averaged is not None and ema is not False:
        state, which = dict(averaged[0]), f"ema ({averaged[1]} updates)"
    else:
        prefix = "backbone."
        state, which = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}, "raw"
    return rebuild(state, meta["backbone"], meta["lora"]), LoRA(**meta["lora"]), which


def export_lora(ckpt: str | Path, out_dir: str | Path, *, ema: bool | None = None) -> Path:
    """The adapter of a LoRA run's checkpoint as an adapter folder (`ldm.models.lora.save_adapter`); returns it."""
    backbone, lora, which = lora_backbone(ckpt, ema)
    return save_adapter(backbone, lora, out_dir, weights=which, source=str(Path(ckpt).resolve()))


def add_lora(pipeline: LatentDiffusionPipeline, path: str | Path, scale: float = 1.0) -> LatentDiffusionPipeline:
    """The pipeline with the adapter at `path` merged into its backbone at `scale` (sampling then costs nothing
    extra); in place, returns it."""
    attach_adapter(pipeline.backbone, path, scale=scale, merge=True)
    pipeline.weights = f"{pipeline.weights} + LoRA {path} x {scale:g}"
    return pipeline
