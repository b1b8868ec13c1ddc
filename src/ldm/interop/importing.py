"""Released Stable Diffusion 1.x/2.x weights (a single file, or a diffusers folder) -> our pipeline export, the folder
`scripts/sample.py ckpt=` samples from and `model.init_from=` starts a stage-2 run from.

The export holds the UNet, the text tower and an autoencoder export whose latent statistics are the release's
(SD's scale 0.18215, from the diffusers `scaling_factor` or the single-file convention), marked on its card as not
measured; the process is the release's: scaled-linear betas, eps or v as it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.inference.loading import write_export
from ldm.interop.single_file import SD_LATENT_SCALE, Prediction, load_single_file
from ldm.models.autoencoder.convert import load_diffusers_autoencoder
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.convert import load_diffusers_unet, read_diffusers_folder
from ldm.models.unet.unet import UNet
from ldm.utils.logging import get_logger

log = get_logger(__name__)
SCHEDULES = {"scaled_linear": "ldm.diffusion.schedules.ScaledLinearSchedule",
             "linear": "ldm.diffusion.schedules.LinearSchedule"}
PARAMETERIZATIONS = {"eps": "ldm.diffusion.parameterization.EpsPrediction",
                     "v": "ldm.diffusion.parameterization.VPrediction"}
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


@dataclass
class Imported:
    """Our parts of a release, and the settings it was trained with."""

    backbone: UNet
    autoencoder: AutoencoderKL
    text_encoder: OpenCLIPTextEncoder
    text_encoder_config: dict[str, Any]
    process: dict[str, Any]
    resolution: int
    source: str


def process_config(prediction: Prediction, *, beta_schedule: str = "scaled_linear", num_timesteps: int = 1000,
                   beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = False
                   ) -> dict[str, Any]:
    """A `DiffusionProcess` config of SD's kind: DDPM betas (SD: scaled_linear 0.00085..0.012 over 1000 steps),
    the network predicting eps or v, integer timesteps as c_noise, no shift."""
    if beta_schedule not in SCHEDULES:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; one of {sorted(SCHEDULES)}")
    if prediction not in PARAMETERIZATIONS:
        raise ValueError(f"prediction must be one of {sorted(PARAMETERIZATIONS)}, got {prediction!r}")
    schedule = {"_target_": SCHEDULES[beta_schedule], "num_timesteps": num_timesteps, "beta_start": beta_start,
                "beta_end": beta_end, "zero_terminal_snr": zero_terminal_snr}
    return {"_target_": "ldm.diffusion.process.DiffusionProcess", "schedule": schedule,
            "parameterization": {"_target_": PARAMETERIZATIONS[prediction], "schedule": dict(schedule)},
            "shift": {"_target_": "ldm.diffusion.shift.TimestepShift", "shift": 1.0}, "patch_size": 1}


# -------------------------------------------------------------------------------------------------------
# Sources
# -------------------------------------------------------------------------------------------------------


def from_single_file(path: str | Path, *, prediction: Prediction | None = None, resolution: int | None = None,
                     **unet: Any) -> Imported:
    """An SD 1.x/2.x single file; `prediction` is needed where the file does not say (SD 2.x: 768-v is v,
    512-base eps); `unet` takes `num_heads`/`head_channels` where they are not SD's (see `load_single_file`)."""
    loaded = load_single_file(path, prediction=prediction, **unet)
    if loaded.prediction is None:
        raise ValueError(f"{path} does not say whether its UNet predicts eps or v (SD 2.x 768 px models are v, "
                         "2.x-base and 1.x are eps): pass prediction=eps or prediction=v")
    if loaded.text_encoder is None:
        raise ValueError(f"{path} holds no text tower (expected cond_stage_model.model.* for SD 2.x or "
                         "cond_stage_model.transformer.* for SD 1.x)")
    spec = loaded.metadata.get("modelspec.resolution", "")
    if resolution is None and spec:
        resolution = int(spec.split("x")[0])
    if resolution is None:
        resolution = 768 if loaded.version == "v2" and loaded.prediction == "v" else 512
        log.info(f"{path}: resolution {resolution} assumed (SD {loaded.version}, {loaded.prediction}); "
                 "pass resolution=N otherwise")
    return Imported(backbone=loaded.backbone, autoencoder=loaded.autoencoder, text_encoder=loaded.text_encoder,
                    text_encoder_config=loaded.text_encoder_config, process=process_config(loaded.prediction),
                    resolution=resolution, source=str(Path(path).resolve()))


def diffusers_unet_and_vae(folder: str | Path, prediction: Prediction | None = None
                           ) -> tuple[UNet, AutoencoderKL, dict[str, Any], int]:
    """The UNet, the VAE (its `scaling_factor` as latent scale), the process (from `scheduler/`) and the resolution
    of a diffusers Stable Diffusion folder."""
    folder = Path(folder)
    for part, what in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("scheduler", "scheduler")):
        if not (folder / part).is_dir():
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise FileNotFoundError(f"{folder} lacks {part}/ (the {what}) of a diffusers Stable Diffusion folder; "
                                    f"it has {found}")
    unet = load_diffusers_unet(folder / "unet")
    vae = load_diffusers_autoencoder(folder / "vae")
    unet_config, _ = read_diffusers_folder(folder / "unet")
    scheduler_file = next((folder / "scheduler").glob("scheduler_config.json"), None)
    if scheduler_file is None:
        raise FileNotFoundError(f"{folder}/scheduler has no scheduler_config.json")
    scheduler = json.loads(scheduler_file.read_text())
    found = _DIFFUSERS_PREDICTION.get(scheduler.get("prediction_type", "epsilon"))
    if found is None:
        raise ValueError(f"{scheduler_file}: prediction_type {scheduler['prediction_type']!r} is not one of "
                         f"{sorted(_DIFFUSERS_PREDICTION)}")
    if prediction is not None and prediction != found:
        raise ValueError(f"prediction={prediction} was asked for, but {scheduler_file} says {found}")
    process = process_config(found, beta_schedule=scheduler.get("beta_schedule", "linear"),
                             num_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                             beta_start=float(scheduler.get("beta_start", 0.0001)),
                             beta_end=float(scheduler.get("beta_end", 0.02)),
                             zero_terminal_snr=bool(scheduler.get("rescale_betas_zero_snr", False)))
    resolution = int(unet_config.get("sample_size", 64)) * vae.downsample_factor
    return unet.eval(), vae.eval(), process, resolution


def from_diffusers(folder: str | Path, *, prediction: Prediction | None = None, resolution: int | None = None
                   ) -> Imported:
    """A diffusers Stable Diffusion folder (`unet/`, `vae/`, `scheduler/`, `text_encoder/`)."""
    folder = Path(folder)
    unet, vae, process, native = diffusers_unet_and_vae(folder, prediction)
    if not (folder / "text_encoder").is_dir():
        raise FileNotFoundError(f"{folder} lacks text_encoder/ (a transformers CLIPTextModel)")
    encoder, config = diffusers_text_encoder(folder / "text_encoder")
    return Imported(backbone=unet, autoencoder=vae, text_encoder=encoder, text_encoder_config=config,
                    process=process, resolution=resolution or native, source=str(folder.resolve()))


def diffusers_text_encoder(folder: Path) -> tuple[OpenCLIPTextEncoder, dict[str, Any]]:
    """A diffusers `text_encoder/` (transformers `CLIPTextModel`) as our OpenCLIP text encoder (`clip_text_tower`)."""
    from ldm.interop.compvis import build_text_encoder, clip_text_tower

    config, state = read_diffusers_folder(folder) if any(folder.glob("diffusion_pytorch_model*")) else \
        _read_transformers_folder(folder)
    encoder_cfg, tower = clip_text_tower(config, state, quick_gelu=config.get("hidden_act") == "quick_gelu")
    return build_text_encoder(encoder_cfg, tower, folder), encoder_cfg


def _read_transformers_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{folder}: expected config.json and model.safetensors (transformers CLIPTextModel)")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return json.loads((folder / "config.json").read_text()), state


# -------------------------------------------------------------------------------------------------------
# The export
# -------------------------------------------------------------------------------------------------------


def import_weights(source: str | Path, out_dir: str | Path, *, prediction: Prediction | None = None,
                   resolution: int | None = None, **unet: Any) -> Path:
    """A single file or a diffusers folder -> our pipeline export in `out_dir` (see the module docstring)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass an SD 1.x/2.x single file (.safetensors/.ckpt) or a "
                                "diffusers folder (unet/, vae/, scheduler/, text_encoder/)")
    imported = from_diffusers(source, prediction=prediction, resolution=resolution) if source.is_dir() else \
        from_single_file(source, prediction=prediction, resolution=resolution, **unet)
    return write_imported(imported, out_dir)


def write_imported(imported: Imported, out_dir: str | Path) -> Path:
    """Write `imported` in the layout of `ldm.inference.loading.export_pipeline`."""
    scale = float(imported.autoencoder.latent_scale)
    parts = {
        "backbone": {"_target_": "ldm.models.unet.unet.UNet", **_plain(imported.backbone.config)},
        "text_encoder": {"_target_": "ldm.models.text_encoder.openclip.OpenCLIPTextEncoder", "trainable_layers": 0,
                         "context_length": None, "model_config_dir": None, "cache_size": 0,
                         **imported.text_encoder_config},
        "autoencoder": {"_target_": "ldm.models.autoencoder.export.load_autoencoder"},
        "process": imported.process,
    }
    return write_export(
        out_dir, parts=parts, backbone=imported.backbone.state_dict(),
        text_encoder={f"text.{k}": v for k, v in imported.text_encoder.text.state_dict().items()},
        autoencoder=imported.autoencoder, resolution=imported.resolution, weights="imported", source=imported.source,
        latent_stats_source=(f"release: the released scale {scale:g}{' (SD)' if abs(scale - SD_LATENT_SCALE) < 1e-6 else ''}, "
                             "not measured on data"))


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
