"""Checkpoint helpers: read a checkpoint safely, resolve `ckpt_path=last`, and refuse checkpoints built for another
architecture."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """A `torch.save`d checkpoint (ours, or one from elsewhere) on the CPU, unpickled with `weights_only=True`: tensors,
    numbers, strings and plain containers only, so a crafted file cannot execute code while it loads (the risk of
    `weights_only=False`). Our checkpoints hold nothing else (their configs are stored as plain dicts)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} holds objects other than tensors and plain containers ({reason}). ldm reads "
                         "checkpoints with weights_only=True so that a file cannot run code; if you trust this "
                         "one, load it yourself and save its plain state dict.") from e
    except RuntimeError as e:  # torch's zip reader: a truncated file, or not a torch file at all
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated, or another format?): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, runs_root: Path | None) -> str | None:
    """Turn `last` into a file: this run's `last.ckpt`, else the newest one of an earlier run of the same task.
    `auto` takes this run's own `last.ckpt` when there is one and otherwise starts fresh (SLURM requeues).

    Any other value must be an existing file; a missing one is an error rather than a silent fresh start.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":  # a requeued job continues in its own folder; a first submission starts fresh
        own = output_dir / CHECKPOINT_DIR / LAST
        return str(own) if own.is_file() else None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist.")
        return str(ckpt_path)
    own = output_dir / CHECKPOINT_DIR / LAST
    if own.is_file():
        return str(own)
    candidates = sorted(runs_root.glob(f"*/{CHECKPOINT_DIR}/{LAST}"), key=lambda p: p.stat().st_mtime) if runs_root else []
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no {CHECKPOINT_DIR}/{LAST} in {output_dir} nor in any run under {runs_root}. "
            "Start without ckpt_path, or pass an explicit checkpoint file."
        )
    return str(candidates[-1])


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two architecture dicts, formatted `key: saved -> current`."""
    keys = sorted(set(saved) | set(current))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (json turns tuples into lists)
    return [f"{k}: {saved.get(k, '<missing>')!r} -> {current.get(k, '<missing>')!r}"
            for k in keys if norm(saved.get(k)) != norm(current.get(k))]


def check_architecture(saved: Mapping[str, Any] | None, current: Mapping[str, Any], what: str) -> None:
    """Raise a ValueError naming every mismatching constructor argument of `what`."""
    if saved is None:
        return
    diff = config_mismatches(saved, current)
    if diff:
        raise ValueError(
            f"The checkpoint's {what} architecture does not match the configured one "
            f"(checkpoint -> config): {'; '.join(diff)}. Use the config the checkpoint was trained with, "
            "or start a fresh run."
        )


def upgrade_stage2_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before the backbone contract call the denoiser `unet`; rename it `backbone` in place
    (weights, architecture record, EMA), so that they resume, sample and evaluate as before."""
    state = ckpt.get("state_dict") or {}
    if any(k.startswith("unet.") for k in state):
        ckpt["state_dict"] = {f"backbone.{k[5:]}" if k.startswith("unet.") else k: v for k, v in state.items()}
    meta = ckpt.get("ldm") or {}
    if "unet" in meta:
        meta.setdefault("backbone", {"_target_": "ldm.models.unet.unet.UNet", **meta.pop("unet")})
    for callback_state in (ckpt.get("callbacks") or {}).values():
        if isinstance(callback_state, dict) and callback_state.get("attribute") == "unet":
            callback_state["attribute"] = "backbone"
    return ckpt


def upgrade_model_config(model_cfg: Any) -> Any:
    """The same upgrade of a stage-2 run's `model` config, in place: `model.unet` -> `model.backbone`, and the
    schedule and parameterization that lived in `model.loss` -> `model.process` (no shift, as then)."""
    from omegaconf import open_dict

    with open_dict(model_cfg):
        loss = model_cfg.get("loss") or {}
        if "process" not in model_cfg and "schedule" in loss:
            model_cfg.process = {"_target_": "ldm.diffusion.process.DiffusionProcess", "schedule": loss.schedule,
                                 "parameterization": loss.parameterization}
        if "unet" in model_cfg and "backbone" not in model_cfg:
            model_cfg.backbone = model_cfg.pop("unet")
        if "compile_unet" in model_cfg:
            model_cfg.compile_backbone = model_cfg.pop("compile_unet")
    return model_cfg
