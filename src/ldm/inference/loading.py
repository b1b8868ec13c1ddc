"""Rebuild a LatentDiffusionPipeline from a stage-2 training checkpoint (plus the resolved config train.py writes
beside it) or from an exported folder, with the EMA or the raw backbone weights; and write such an export.

Export layout (`export_pipeline`): `pipeline.yaml` (the parts' configs, the resolution, which weights), the backbone as
`backbone.safetensors` (`unet.safetensors` in exports written before the backbone contract), the text encoder as `text_encoder.safetensors` when no pretrained file can rebuild it, and the
stage-1 export under `autoencoder/`. Like `cli/train.build`, this module turns configs into objects.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.models.autoencoder.export import (
    autoencoder_hash,
    autoencoder_mismatch,
    export_autoencoder,
    weights_hash,
)
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.lora import merged_weights
from ldm.utils.checkpoint import read_checkpoint, upgrade_model_config, upgrade_stage2_checkpoint
from ldm.utils.logging import get_logger

log = get_logger(__name__)
RESOLVED_CONFIG = "config_resolved.yaml"
EXPORT_CARD, BACKBONE_FILE, TEXT_FILE, AUTOENCODER_DIR = "pipeline.yaml", "backbone.safetensors", \
    "text_encoder.safetensors", "autoencoder"
OLD_BACKBONE_FILE = "unet.safetensors"


def find_run_config(ckpt: Path) -> Path:
    """`<run>/config_resolved.yaml` for `<run>/checkpoints/<name>.ckpt` (or beside the file)."""
    for directory in (ckpt.parent.parent, ckpt.parent):
        if (directory / RESOLVED_CONFIG).is_file():
            return directory / RESOLVED_CONFIG
    raise FileNotFoundError(f"No {RESOLVED_CONFIG} beside {ckpt} or in {ckpt.parent.parent}: train.py writes it into "
                            "the run folder. Pass config=<that file>, or sample from an export instead.")


def ema_state(ckpt: dict[str, Any], attribute: str = "backbone") -> tuple[dict[str, torch.Tensor], int] | None:
    """The EMA callback's (state dict, number of updates) of `attribute` in a Lightning checkpoint, if any."""
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("attribute") == attribute and "state_dict" in state:
            return state["state_dict"], int(state["num_updates"])
    return None


def backbone_weights(path: str | Path, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone weights of a stage-2 `.ckpt` (EMA when it has them, unless ema=False) or of a pipeline export,
    and which they are: to start a new run from them (`model.init_from`, multi-stage resolution training)."""
    path = Path(path)
    if path.is_dir():
        if not (path / EXPORT_CARD).is_file():
            raise FileNotFoundError(f"{path} is a folder without {EXPORT_CARD}: not an ldm pipeline export.")
        file = path / (BACKBONE_FILE if (path / BACKBONE_FILE).is_file() else OLD_BACKBONE_FILE)
        return load_file(str(file)), str(OmegaConf.load(path / EXPORT_CARD).weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a stage-2 .ckpt or a pipeline export folder.")
    ckpt = upgrade_stage2_checkpoint(read_checkpoint(path))
    if ckpt.get("ldm", {}).get("stage") != "diffusion":
        raise ValueError(f"{path} is not a stage-2 (diffusion) checkpoint of ldm")
    averaged = ema_state(ckpt)
    if ema and averaged is None:
        raise ValueError(f"{path} holds no EMA weights; pass ema=false for the raw ones.")
    if averaged is not None and ema is not False:
        return _merge_lora(dict(averaged[0]), ckpt), f"ema ({averaged[1]} updates)"
    raw = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    return _merge_lora(raw, ckpt), "raw"


def _merge_lora(backbone: dict[str, torch.Tensor], ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A LoRA run's backbone weights (`ckpt['ldm']['lora']`) with the adapters merged in; others as they are."""
    meta = ckpt.get("ldm", {})
    return merged_weights(backbone, meta["backbone"], meta["lora"]) if meta.get("lora") else backbone


def recorded_backbone(path: str | Path) -> dict[str, Any] | None:
    """The backbone config (`_target_` + constructor arguments) a stage-2 `.ckpt` or pipeline export records; None
    for files from before checkpoints recorded it."""
    path = Path(path)
    if path.is_dir():
        card = OmegaConf.load(path / EXPORT_CARD) if (path / EXPORT_CARD).is_file() else None
        node = OmegaConf.select(card, "model.backbone") if card is not None else None
        return OmegaConf.to_container(node, resolve=True) if node is not None else None  # type: ignore[return-value]
    ckpt = upgrade_stage2_checkpoint(read_checkpoint(path, mmap=True))
    return ckpt.get("ldm", {}).get("backbone")


def locate_autoencoder(model_cfg: DictConfig, run_config: Path | None, trained_with: str | None,
                       override: str | Path | None = None) -> Path:
    """The stage-1 autoencoder to sample a stage-2 checkpoint with.

    `override` (the user's `autoencoder=`) is taken as given, with a warning when it is not the one the model was
    trained with (a fine-tuned decoder is a legitimate choice). Otherwise the config's path: a run folder moved
    or copied with its project records the original's path, so the same place relative to the run folder is
    tried first, then the path as recorded; of these, the one holding the autoencoder whose hash the checkpoint
    records (`trained_with`) is taken, and if none does, loading is refused naming both hashes.
    """
    if override is not None:
        if trained_with is not None and (given := autoencoder_hash(override)) != trained_with:
            log.warning(f"autoencoder={override} is autoencoder {given}, but the model was trained with "
                        f"{trained_with}: samples are only meaningful if the two share a latent space.")
        return Path(override)
    recorded = Path(model_cfg.autoencoder.path)
    candidates = [p for p in (_relocated(recorded, run_config), recorded) if p is not None and p.exists()]
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise FileNotFoundError(f"The autoencoder this model was trained with, {recorded}, is missing; pass "
                                "autoencoder=<stage-1 export folder>.")
    if trained_with is None:  # a checkpoint from before the hash was recorded
        return candidates[0]
    hashes = {candidate: autoencoder_hash(candidate) for candidate in candidates}
    match = next((candidate for candidate, h in hashes.items() if h == trained_with), None)
    if match is None:
        raise autoencoder_mismatch(trained_with, hashes[candidates[0]], f"{candidates[0]} (model.autoencoder.path)")
    return match


def _relocated(recorded: Path, run_config: Path | None) -> Path | None:
    """Where `recorded` is now if the run folder moved with it: the same path relative to the run folder."""
    if run_config is None:
        return None
    original_run = OmegaConf.select(OmegaConf.load(run_config), "paths.output_dir")
    run_dir = run_config.parent
    if not original_run or Path(original_run).resolve() == run_dir.resolve():
        return None
    if not recorded.is_absolute():  # relative to the directory train.py was started from
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd") if hydra_file.is_file() else None
        if cwd is None:
            return None
        recorded = Path(cwd) / recorded
    return Path(os.path.normpath(run_dir / os.path.relpath(recorded, original_run)))


def _load_lightning(path: Path, config: Path | None, ema: bool | None
                    ) -> tuple[DictConfig, dict, dict | None, str, Path, str | None]:
    ckpt = upgrade_stage2_checkpoint(read_checkpoint(path))
    meta = ckpt.get("ldm", {})
    if meta.get("stage") != "diffusion":
        raise ValueError(f"{path} is not a stage-2 (diffusion) checkpoint of ldm "
                         f"(ckpt['ldm']['stage'] = {meta.get('stage')!r}); sample.py needs one from experiment=ldm_*.")
    run_config: Path | None = config
    if run_config is None:
        try:
            run_config = find_run_config(path)
        except FileNotFoundError:
            if "config" not in meta:  # a checkpoint from before checkpoints carried their config
                raise
    # The run's file when there is one (a hand-edited config stays possible), else the checkpoint's own copy.
    cfg = OmegaConf.load(run_config) if run_config is not None else OmegaConf.create(meta["config"])
    state = ckpt["state_dict"]
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    text = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")} or None
    averaged = ema_state(ckpt)
    if ema and averaged is None:
        raise ValueError(f"{path} holds no EMA weights (the run had no `ema` callback); pass ema=false for the raw ones.")
    weights = "raw"
    if averaged is not None and ema is not False:
        backbone, weights = averaged[0], f"ema ({averaged[1]} updates)"
    if meta.get("lora"):
        backbone, weights = _merge_lora(backbone, ckpt), f"{weights}, LoRA merged"
    return upgrade_model_config(cfg.model), {"backbone": backbone, "text_encoder": text}, cfg.get("data"), weights, run_config, \
        meta.get("autoencoder_sha256")


def load_pipeline(path: str | Path, *, ema: bool | None = None, config: str | Path | None = None,
                  autoencoder: str | Path | None = None, device: str | torch.device = "cpu"
                  ) -> LatentDiffusionPipeline:
    """A pipeline from a stage-2 `.ckpt` or an export folder.

    Args:
        ema: True requires EMA weights, False takes the raw ones, None takes EMA when the checkpoint has it.
        config: the run's resolved config, when it is not at `<run>/config_resolved.yaml`.
        autoencoder: the stage-1 export to use instead of the path recorded in the config.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Pass ckpt=<run>/checkpoints/last.ckpt of a stage-2 "
                                "run (python train.py experiment=ldm_tiny ...) or an export folder.")
    if path.is_dir():
        card = OmegaConf.load(path / EXPORT_CARD) if (path / EXPORT_CARD).is_file() else None
        if card is None:
            raise FileNotFoundError(f"{path} is a folder without {EXPORT_CARD}: not an ldm pipeline export.")
        model_cfg, data_cfg, weights = upgrade_model_config(card.model), {"resolution": card.resolution}, \
            str(card.weights)
        backbone_file = path / (BACKBONE_FILE if (path / BACKBONE_FILE).is_file() else OLD_BACKBONE_FILE)
        states = {"backbone": load_file(str(backbone_file)),
                  "text_encoder": load_file(str(path / TEXT_FILE)) if (path / TEXT_FILE).is_file() else None}
        model_cfg.autoencoder.path = str(path / AUTOENCODER_DIR)
        run_config, trained_with = None, card.get("autoencoder_sha256")
    else:
        model_cfg, states, data_cfg, weights, run_config, trained_with = _load_lightning(
            path, Path(config) if config else None, ema)
    autoencoder = locate_autoencoder(model_cfg, run_config, trained_with, autoencoder)
    pipeline = build_pipeline(model_cfg, autoencoder=autoencoder,
                              resolution=(data_cfg or {}).get("resolution"))
    _load_part(pipeline.backbone, states["backbone"], "backbone", path)
    if states["text_encoder"] is not None:
        _load_part(pipeline.text_encoder, states["text_encoder"], "text encoder", path)
    elif not pipeline.text_encoder.rebuildable:
        raise ValueError(f"{path} has no text-encoder weights and its config has none to load (pretrained=null).")
    pipeline.weights = weights
    log.info(f"Loaded {path} ({weights} {type(pipeline.backbone).__name__} weights)")
    return pipeline.eval().requires_grad_(False).to(device)


def build_pipeline(model_cfg: DictConfig, *, autoencoder: str | Path | None = None,
                   resolution: int | None = None) -> LatentDiffusionPipeline:
    """The parts of a stage-2 model config (`model.backbone`, `.text_encoder`, `.autoencoder`, `.process`), without
    the optimizer or the Lightning module."""
    ae_cfg = OmegaConf.merge(model_cfg.autoencoder, {"path": str(autoencoder)} if autoencoder else {})
    if not Path(ae_cfg.path).exists():
        raise FileNotFoundError(f"The autoencoder this model was trained with, {ae_cfg.path}, is missing; pass "
                                "autoencoder=<stage-1 export folder>.")
    return LatentDiffusionPipeline(
        backbone=hydra.utils.instantiate(model_cfg.backbone),
        text_encoder=hydra.utils.instantiate(model_cfg.text_encoder),
        autoencoder=hydra.utils.instantiate(ae_cfg),
        process=hydra.utils.instantiate(model_cfg.process),
        resolution=resolution,
    )


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"The {what} weights in {path} do not match the configured {what}: missing "
                         f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}. Was the checkpoint "
                         "trained with another config?")


def export_pipeline(ckpt: str | Path, out_dir: str | Path, *, ema: bool | None = None,
                    config: str | Path | None = None, autoencoder: str | Path | None = None,
                    backbone: Mapping[str, torch.Tensor] | None = None, weights: str | None = None) -> Path:
    """Write a self-contained export of a stage-2 checkpoint (see the module docstring); returns `out_dir`.
    `backbone` replaces the checkpoint's backbone weights (a post-hoc EMA), `weights` names them on the card."""
    ckpt, out = Path(ckpt), Path(out_dir)
    model_cfg, states, data_cfg, recorded, run_config, trained_with = _load_lightning(
        ckpt, Path(config) if config else None, ema)
    if backbone is not None:
        states["backbone"] = dict(backbone)
    weights = weights or recorded
    autoencoder = locate_autoencoder(model_cfg, run_config, trained_with, autoencoder)
    pipeline = build_pipeline(model_cfg, autoencoder=autoencoder)  # checks that every part loads
    _load_part(pipeline.backbone, states["backbone"], "backbone", ckpt)
    parts = {k: model_cfg[k] for k in ("backbone", "text_encoder", "autoencoder", "process")}
    return write_export(out, parts=parts, backbone=states["backbone"], text_encoder=states["text_encoder"],
                        autoencoder=pipeline.autoencoder, resolution=(data_cfg or {}).get("resolution"),
                        weights=weights, source=str(ckpt.resolve()))


def write_export(out_dir: str | Path, *, parts: Mapping[str, Any], backbone: Mapping[str, torch.Tensor],
                 text_encoder: Mapping[str, torch.Tensor] | None, autoencoder: AutoencoderKL,
                 resolution: int | None, weights: str, source: str, **autoencoder_card: Any) -> Path:
    """The export layout (see the module docstring) from its parts: `parts` holds the configs of `backbone`,
    `text_encoder`, `autoencoder` (its path is set here) and `process`; `autoencoder_card` adds entries to the
    autoencoder's card. Returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.items()}, str(out / BACKBONE_FILE))
    if text_encoder is not None:
        save_file({k: v.contiguous() for k, v in text_encoder.items()}, str(out / TEXT_FILE))
    if (out / AUTOENCODER_DIR).exists():
        shutil.rmtree(out / AUTOENCODER_DIR)
    export_autoencoder(autoencoder, out / AUTOENCODER_DIR, **autoencoder_card)
    parts = dict(parts)
    parts["autoencoder"] = OmegaConf.merge(parts["autoencoder"], {"path": AUTOENCODER_DIR})
    card = {"model": parts, "resolution": resolution, "weights": weights, "source": source,
            "autoencoder_sha256": weights_hash(autoencoder)}
    OmegaConf.save(OmegaConf.create(card), out / EXPORT_CARD)
    return out
