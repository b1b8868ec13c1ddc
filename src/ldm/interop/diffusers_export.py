"""Export a stage-2 model (a Lightning `.ckpt` or our pipeline export) as a diffusers folder: `vae/`, `unet/` or
`transformer/`, `scheduler/`, `text_encoder/` + `tokenizer/` and, for the UNet family, the `model_index.json` of a
`StableDiffusionPipeline`, so that `StableDiffusionPipeline.from_pretrained(folder)` samples what our pipeline does.

What diffusers cannot represent is left out, named in `ldm_export.json` in the folder and in a warning; a backbone
with no diffusers class is an error. The conversions themselves live next to each model (`unet_to_diffusers`,
`autoencoder_to_diffusers`, `dit_to_diffusers` / `mmdit_to_diffusers`, `openclip_to_clip_text`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.inference.loading import EXPORT_CARD, find_run_config, load_pipeline
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.interop.diffusers_scheduler import scheduler_for_process
from ldm.models.autoencoder.convert import autoencoder_to_diffusers, latent_norm_for_sd_pipeline
from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.unet.unet import UNet
from ldm.utils.checkpoint import read_checkpoint, upgrade_model_config, upgrade_stage2_checkpoint
from ldm.utils.logging import get_logger

log = get_logger(__name__)
NOTE = "ldm_export.json"


@dataclass
class DiffusersExport:
    """What `export_diffusers` wrote: the folder, the parts written, and the parts left out with the reason."""

    path: Path
    written: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    pipeline: str | None = None  # the diffusers pipeline class in model_index.json, if one was written


def export_diffusers(source: str | Path, out_dir: str | Path, *, ema: bool | None = None,
                     config: str | Path | None = None, autoencoder: str | Path | None = None) -> DiffusersExport:
    """Write the diffusers folder of a stage-2 `.ckpt` or a pipeline export (see the module docstring).

    Args:
        ema: None (default) takes the EMA weights when the checkpoint has them, False the raw ones, True requires EMA.
        config, autoencoder: as for `load_pipeline` (the run's config, another stage-1 export).
    """
    source, out = Path(source), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / NOTE).is_file():
        raise FileExistsError(f"{out} exists and is not an earlier diffusers export (no {NOTE}); pick a new folder")
    pipeline = load_pipeline(source, ema=ema, config=config, autoencoder=autoencoder)
    process_cfg = read_model_config(source, config).process
    export = DiffusersExport(out)
    parts: dict[str, Any] = {}

    backbone_name, backbone = _backbone(pipeline)
    parts["unet" if isinstance(pipeline.backbone, UNet) else "transformer"] = backbone
    parts["vae"] = _vae(pipeline)
    scheduler = scheduler_for_process(process_cfg)
    if scheduler.scheduler is None:
        export.missing["scheduler"] = str(scheduler.reason)
    else:
        parts["scheduler"] = scheduler.scheduler
    try:
        parts["text_encoder"], parts["tokenizer"] = _text_encoder(pipeline)
    except (ImportError, ValueError) as error:  # transformers missing, or a tower CLIPTextModel cannot express
        export.missing["text_encoder"] = export.missing["tokenizer"] = str(error)
    if getattr(pipeline.backbone, "pooled_dim", None) is not None:
        export.missing["pooled text embedding"] = (
            f"{type(pipeline.backbone).__name__} also takes the pooled embedding of the text tower's last block; "
            "text_encoder/ (a CLIPTextModel) gives the token states only")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    blocker = _sd_pipeline_blocker(backbone_name, parts, export.missing)
    if blocker is None:
        from diffusers import StableDiffusionPipeline

        sd = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     tokenizer=parts["tokenizer"], unet=parts["unet"], scheduler=parts["scheduler"],
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        sd.save_pretrained(str(out), safe_serialization=True)
        export.pipeline = "StableDiffusionPipeline"
    else:
        for name, part in parts.items():
            part.save_pretrained(str(out / name))
        export.missing["model_index.json"] = blocker
    export.written = sorted(parts)
    _write_note(export, pipeline, source, scheduler.matches)
    for part, reason in export.missing.items():
        warnings.warn(f"diffusers export of {source}: {part} not written: {reason}", UserWarning, stacklevel=2)
    log.info(f"Exported {source} ({pipeline.weights} weights) to {out} as diffusers parts {export.written}")
    return export


def read_model_config(source: str | Path, config: str | Path | None = None) -> DictConfig:
    """The stage-2 model config that `load_pipeline` builds from: the export's card, or the run's resolved config
    (beside the checkpoint or `config`), else the copy the checkpoint carries."""
    source = Path(source)
    if source.is_dir():
        return upgrade_model_config(OmegaConf.load(source / EXPORT_CARD).model)
    run_config: Path | None = Path(config) if config else None
    if run_config is None:
        try:
            run_config = find_run_config(source)
        except FileNotFoundError:
            run_config = None
    if run_config is not None:
        return upgrade_model_config(OmegaConf.load(run_config).model)
    ckpt = upgrade_stage2_checkpoint(read_checkpoint(source, mmap=True))
    if "config" not in ckpt.get("ldm", {}):
        raise ValueError(f"{source} carries no config (a checkpoint from before they did): pass config=<the run's "
                         "config_resolved.yaml>")
    return upgrade_model_config(OmegaConf.create(ckpt["ldm"]["config"]).model)


# -------------------------------------------------------------------------------------------------------
# Parts
# -------------------------------------------------------------------------------------------------------


def _backbone(pipeline: LatentDiffusionPipeline) -> tuple[str, Any]:
    """(diffusers class name, model) of the backbone; a backbone diffusers has no class for is an error."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from ldm.models.convert_transformers import dit_to_diffusers, mmdit_to_diffusers
    from ldm.models.unet.convert import unet_to_diffusers

    backbone = pipeline.backbone
    converters = {UNet: (unet_to_diffusers, UNet2DConditionModel), DiT: (dit_to_diffusers, PixArtTransformer2DModel),
                  MMDiT: (mmdit_to_diffusers, SD3Transformer2DModel)}
    kind = next((k for k in converters if isinstance(backbone, k)), None)
    if kind is None:
        raise ValueError(f"the backbone {type(backbone).__name__} has no diffusers counterpart; exportable: UNet "
                         "(UNet2DConditionModel), DiT (PixArtTransformer2DModel), MMDiT (SD3Transformer2DModel)")
    convert, cls = converters[kind]
    try:
        if kind is UNet:
            size = pipeline.resolution // pipeline.autoencoder.downsample_factor if pipeline.resolution else None
            config, state = convert(backbone, sample_size=size)
        else:
            config, state = convert(backbone)
    except ValueError as error:
        raise ValueError(f"the {type(backbone).__name__} backbone cannot be written as diffusers' {cls.__name__}: "
                         f"{error}") from error
    model = cls(**config)
    model.load_state_dict(state, strict=True)
    return cls.__name__, model.eval()


def _vae(pipeline: LatentDiffusionPipeline) -> Any:
    from diffusers import AutoencoderKL

    config, state = autoencoder_to_diffusers(pipeline.autoencoder, sample_size=pipeline.resolution)
    model = AutoencoderKL(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _text_encoder(pipeline: LatentDiffusionPipeline) -> tuple[Any, Any]:
    """transformers' CLIPTextModel and CLIPTokenizer of our OpenCLIP tower (ImportError without transformers)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as error:
        raise ImportError("transformers is not installed (pip install transformers): the text encoder is written "
                          "as a transformers CLIPTextModel") from error
    import tempfile

    from ldm.models.text_encoder.convert import openclip_to_clip_text, write_clip_tokenizer

    config, state = openclip_to_clip_text(pipeline.text_encoder)
    model = CLIPTextModel(CLIPTextConfig(**config))
    model.load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(
            str(write_clip_tokenizer(folder, context_length=pipeline.text_encoder.context_length)))
    return model.eval(), tokenizer


def _sd_pipeline_blocker(backbone_name: str, parts: dict[str, Any], missing: dict[str, str]) -> str | None:
    """None when the parts make a StableDiffusionPipeline that samples as ours, else why no model_index.json."""
    if backbone_name != "UNet2DConditionModel":
        return (f"diffusers' pipelines for {backbone_name} (PixArt, SD3) expect T5 (and CLIP) text encoders, not one "
                "OpenCLIP tower: load the parts (transformer/, vae/, scheduler/, text_encoder/) one by one and pass "
                "prompt_embeds")
    if missing:
        return f"StableDiffusionPipeline needs every part; not written: {', '.join(sorted(missing))}"
    latent = latent_norm_for_sd_pipeline(parts["vae"].config)
    if latent is not None:
        return f"the autoencoder's latent normalisation uses {latent}: its images would be wrong"
    return None


def _write_note(export: DiffusersExport, pipeline: LatentDiffusionPipeline, source: Path, matches: str) -> None:
    note = {
        "source": str(source.resolve()), "weights": pipeline.weights, "resolution": pipeline.resolution,
        "pipeline": export.pipeline, "written": export.written, "not_written": export.missing,
        "scheduler_matches": matches or None,
        "text_encoder": None if "text_encoder" in export.missing else (
            f"transformers CLIPTextModel: our OpenCLIP '{pipeline.text_encoder.layer}' layer states as its "
            "last_hidden_state (for 'penultimate', the last block left out as SD 2.x did); pooled output not "
            "exported"),
        "tokenizer": "CLIPTokenizer from open_clip's vocabulary; open_clip also cleans text (ftfy, HTML entities) "
                     "before tokenizing, CLIPTokenizer does not",
    }
    (export.path / NOTE).write_text(json.dumps(note, indent=2) + "\n")
