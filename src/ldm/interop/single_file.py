"""The original single-file Stable Diffusion checkpoint (CompVis key names, one `.safetensors`) that ComfyUI and the
A1111 web UI load: our UNet, autoencoder and OpenCLIP text tower written into it, and read back out of it.

Layout: the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`, SD 2.x's OpenCLIP text tower
under `cond_stage_model.model.` in open_clip's own key names, SD 1.x's CLIP text tower under
`cond_stage_model.transformer.` in transformers' names (the key maps: `ldm.interop.compvis`).

The file holds weights only. What a loader cannot see in the shapes (attention heads, the prediction type, our
latent statistics) is written into the safetensors header: the SAI model-spec keys other tools read
(`modelspec.prediction_type`, ...) and our parts' configs under `ldm.*`, which an import here prefers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ldm.interop.compvis import (
    CLIP_PREFIX,
    NORM_GROUPS,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Version,
    autoencoder_kwargs_from_compvis,
    autoencoder_to_compvis,
    build_text_encoder,
    clip_text_config,
    clip_text_tower,
    match_openclip_model,
    openclip_text_config,
    unet_from_compvis,
    unet_kwargs_from_compvis,
    unet_to_compvis,
)
from ldm.models.autoencoder.convert import convert_compvis_autoencoder
from ldm.models.autoencoder.export import card as autoencoder_card
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.unet import UNet

SD_LATENT_SCALE = 0.18215  # SD 1.x/2.x's `scale_factor`: implied by the format, never stored in the file
Prediction = Literal["eps", "v"]
_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v"}
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")  # in released SD 2.x files; not text-tower weights we keep


# -------------------------------------------------------------------------------------------------------
# The file
# -------------------------------------------------------------------------------------------------------


@dataclass
class SingleFile:
    """What an SD single file holds, as our parts, and what could be read about it."""

    backbone: UNet
    autoencoder: AutoencoderKL
    text_encoder: OpenCLIPTextEncoder | None
    text_encoder_config: dict[str, Any] | None
    version: Version
    prediction: Prediction | None  # None: the file does not say
    metadata: dict[str, str] = field(default_factory=dict)


def single_file_state(backbone: UNet, autoencoder: AutoencoderKL, text_encoder: OpenCLIPTextEncoder | None = None,
                      *, latent_scale_check: bool = True) -> dict[str, Tensor]:
    """Our parts -> one state dict in the CompVis single-file layout (SD 2.x text tower: open_clip keys)."""
    check_exportable(backbone, autoencoder, text_encoder, latent_scale=latent_scale_check)
    sd = {UNET_PREFIX + k: v for k, v in unet_to_compvis(backbone.state_dict()).items()}
    sd.update({VAE_PREFIX + k: v for k, v in autoencoder_to_compvis(autoencoder.state_dict()).items()})
    if text_encoder is not None:
        sd.update({OPENCLIP_PREFIX + k: v for k, v in text_encoder.text.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def check_exportable(backbone: Any, autoencoder: AutoencoderKL, text_encoder: OpenCLIPTextEncoder | None,
                     *, latent_scale: bool = True) -> None:
    """Refuse, naming each, the settings the single-file layout cannot carry (ComfyUI would compute something else)."""
    problems = []
    if not isinstance(backbone, UNet):
        problems.append(f"the backbone is a {type(backbone).__name__}: the SD single file holds a UNet")
    elif backbone.config["norm_groups"] != NORM_GROUPS:
        problems.append(f"the UNet has norm_groups={backbone.config['norm_groups']}; the layout fixes {NORM_GROUPS}")
    ae = autoencoder.config
    for key, want in (("norm_groups", NORM_GROUPS), ("mid_attention", True), ("use_quant_conv", True),
                      ("latent_norm", "scale")):
        if ae.get(key, want) != want:
            problems.append(f"the autoencoder has {key}={ae[key]!r}; the layout needs {want!r}")
    if latent_scale and (abs(float(autoencoder.latent_scale) - SD_LATENT_SCALE) > 1e-6
                         or bool(autoencoder.latent_mean.abs().max() > 0)):
        problems.append(f"the autoencoder's latent scale is {float(autoencoder.latent_scale):.5g} (mean "
                        f"{autoencoder.latent_mean.tolist()}), but ComfyUI and A1111 assume SD's {SD_LATENT_SCALE} and "
                        "no shift (pass latent_scale_check=False to write it anyway; the header records ours)")
    if text_encoder is not None and text_encoder.layer != "penultimate":
        problems.append(f"the text encoder reads layer={text_encoder.layer!r}; SD 2.x files are read as "
                        "'penultimate'")
    if problems:
        raise ValueError("Cannot write an SD single file: " + "; ".join(problems) + ".")


def save_single_file(path: str | Path, backbone: UNet, autoencoder: AutoencoderKL,
                     text_encoder: OpenCLIPTextEncoder | None = None, *, prediction: Prediction,
                     resolution: int | None = None, title: str | None = None,
                     latent_scale_check: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write our parts as one SD 2.x-layout `.safetensors` (ComfyUI's "Load Checkpoint", A1111's models folder).

    Args:
        prediction: what the UNet predicts, "eps" or "v" (the file's `modelspec.prediction_type`).
        latent_scale_check: refuse an autoencoder whose latent scale is not SD's 0.18215 (other tools assume it).
        dtype: store the tensors in this type (torch.float16 halves the file, as released SD files are).
    """
    from safetensors.torch import save_file

    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    state = single_file_state(backbone, autoencoder, text_encoder, latent_scale_check=latent_scale_check)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    v2 = text_encoder is not None or backbone.config["context_dim"] == 1024
    architecture = ("stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512") if v2 \
        else "stable-diffusion-v1"
    metadata = {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title or Path(path).stem, "modelspec.prediction_type": _MODELSPEC_PREDICTION[prediction],
        "ldm.backbone": json.dumps(backbone.config), "ldm.autoencoder": json.dumps(autoencoder_card(autoencoder)),
    }
    if resolution:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    if text_encoder is not None:
        metadata["ldm.text_encoder"] = json.dumps(dict(model_name=text_encoder.model_name, layer=text_encoder.layer,
                                                       context_length=text_encoder.context_length))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def sd_prediction(process: Any) -> Prediction:
    """What a `DiffusionProcess` of SD's kind predicts; refused, naming what differs, when ComfyUI and A1111 would
    sample it with another process than it was trained on (they assume SD's scaled-linear betas, 1000 steps)."""
    from ldm.diffusion.parameterization import EpsPrediction, VPrediction
    from ldm.diffusion.schedules import DiscreteSchedule, ScaledLinearSchedule

    problems = []
    schedule, sd = process.base_schedule, ScaledLinearSchedule()
    if not (isinstance(schedule, DiscreteSchedule) and schedule.num_timesteps == sd.num_timesteps
            and torch.allclose(schedule.betas, sd.betas)):
        problems.append(f"the schedule is {process.describe()['schedule']}, not SD's scaled-linear betas "
                        "0.00085..0.012 over 1000 steps (zero terminal SNR included)")
    if process.shift.for_resolution(64, 64, process.patch_size) != 0:
        problems.append(f"the process has a timestep shift ({process.shift})")
    kind = {EpsPrediction: "eps", VPrediction: "v"}.get(type(process.parameterization))
    if kind is None:
        problems.append(f"the network predicts with {type(process.parameterization).__name__}; SD files hold eps or "
                        "v models")
    if problems:
        raise ValueError("Cannot write an SD single file that other tools sample correctly: " + "; ".join(problems)
                         + ".")
    return kind  # type: ignore[return-value]


def export_single_file(ckpt: str | Path, out: str | Path, *, ema: bool | None = None,
                       latent_scale_check: bool = True, dtype: torch.dtype | None = None) -> Path:
    """A stage-2 `.ckpt` or pipeline export of ours -> one SD single file (`save_single_file`), EMA weights by
    default; the prediction type comes from the model's process, which must be SD's."""
    from ldm.inference.loading import load_pipeline

    pipeline = load_pipeline(ckpt, ema=ema)
    return save_single_file(out, pipeline.backbone, pipeline.autoencoder, pipeline.text_encoder,
                            prediction=sd_prediction(pipeline.process), resolution=pipeline.default_size,
                            title=Path(out).stem, latent_scale_check=latent_scale_check, dtype=dtype)


def read_single_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A single file's tensors and header metadata: `.safetensors`, or a `.ckpt` read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an SD 1.x/2.x single file (.safetensors or .ckpt)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only refusals all mean: not a plain weights file
        raise ValueError(f"{path} could not be read as a weights-only torch checkpoint (truncated, corrupt, or "
                         f"it holds code objects): {error}") from error
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    return {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}, {}


def ema_unet(state: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The EMA UNet of an unpruned CompVis training checkpoint (keys without prefix), None when it has none. Its
    `LitEma` names `model.diffusion_model.a.b.c` as `model_ema.diffusion_modelabc` (dots dropped)."""
    if sum(k.startswith("model_ema.") for k in state) < 100:  # `num_updates` and `decay` alone are no copy
        return None
    flat = {}
    for key in state:
        if key.startswith(UNET_PREFIX):
            name = "model_ema." + "".join(key.split(".")[1:])
            if name not in state:
                raise ValueError(f"the checkpoint's EMA copy lacks {name} (for {key})")
            flat[key[len(UNET_PREFIX):]] = state[name]
    return flat


def detect_version(state: Mapping[str, Tensor]) -> Version:
    """SD 1.x (CLIP text tower, 768-dim context) or 2.x (OpenCLIP, 1024); raises naming the layout it expected."""
    if not any(k.startswith(UNET_PREFIX) for k in state) or not any(k.startswith(VAE_PREFIX) for k in state):
        found = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"Unknown checkpoint layout: expected an SD 1.x/2.x single file with keys under "
                         f"{UNET_PREFIX!r} (UNet) and {VAE_PREFIX!r} (VAE), found top-level names {found[:8]}.")
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "v2"
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return "v1"
    to_k = next((v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    return "v1" if to_k is not None and to_k.shape[1] == 768 else "v2"


def detect_prediction(state: Mapping[str, Tensor], metadata: Mapping[str, str], version: Version) -> Prediction | None:
    """What the file says the UNet predicts: the model-spec header, the `v_pred` marker key of other trainers; SD 1.x
    is always eps. None when it does not say (an SD 2.x file: 768-v or 512-base)."""
    spec = metadata.get("modelspec.prediction_type")
    if spec in ("epsilon", "eps"):
        return "eps"
    if spec in ("v", "v_prediction"):
        return "v"
    if "v_pred" in state:
        return "v"
    return "eps" if version == "v1" else None


def load_single_file(path: str | Path, *, prediction: Prediction | None = None, num_heads: int | None = None,
                     head_channels: int | None = None, backbone: Mapping[str, Any] | None = None,
                     text_model: str | None = None, ema: bool | None = None) -> SingleFile:
    """An SD 1.x/2.x single file -> our UNet, autoencoder and text encoder, with what the file tells about itself.

    Args:
        prediction: "eps" or "v"; must agree with the file where it says.
        num_heads, head_channels: the UNet's attention heads, which the shapes do not show (default: the SD
            convention of the detected version, or what our own export recorded).
        backbone: the UNet config the file must fit (e.g. a run's `model.backbone`): a mismatch is refused by name.
        text_model: the open_clip architecture of the text tower (default: the registered one its shapes match).
        ema: a training checkpoint with `model_ema.*` copies: True requires them, False takes the raw UNet, None
            takes the EMA copy when there is one (released "-ema" files hold only the EMA weights, as the raw ones).
    """
    state, metadata = read_single_file(path)
    version = detect_version(state)
    found = detect_prediction(state, metadata, version)
    if prediction is not None and found is not None and prediction != found:
        raise ValueError(f"prediction={prediction} was asked for, but {path} says its UNet predicts {found}")
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    averaged = ema_unet(state)
    if ema and averaged is None:
        raise ValueError(f"{path} holds no model_ema.* weights; pass ema=false (or leave it unset) for its UNet")
    if averaged is not None and ema is not False:
        unet_sd = averaged
    # The heads, in order: the caller's, the requested config's, our own export's record, else SD's convention.
    recorded = backbone or (json.loads(metadata["ldm.backbone"]) if "ldm.backbone" in metadata else {})
    if num_heads is None and head_channels is None:
        num_heads, head_channels = recorded.get("num_heads"), recorded.get("head_channels")
    kwargs = unet_kwargs_from_compvis(unet_sd, version=version, num_heads=num_heads, head_channels=head_channels)
    if backbone is not None:
        differ = {k: (v, kwargs[k]) for k, v in backbone.items() if k in kwargs and _norm(v) != _norm(kwargs[k])}
        if differ:
            raise ValueError(f"The UNet in {path} does not match the requested config: "
                             + ", ".join(f"{k}: asked {a!r}, file has {b!r}" for k, (a, b) in differ.items()))
    unet = UNet(**kwargs)
    unet.load_state_dict(unet_from_compvis(unet_sd, unet, str(path)), strict=True)

    vae_sd = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    autoencoder = AutoencoderKL(**autoencoder_kwargs_from_compvis(vae_sd))
    converted = convert_compvis_autoencoder(vae_sd)
    try:
        autoencoder.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The VAE in {path} does not fit the autoencoder its shapes suggest: {error}") from error
    card = json.loads(metadata["ldm.autoencoder"]) if "ldm.autoencoder" in metadata else None
    if card is not None:
        autoencoder.set_latent_stats(scale=card["latent_scale"], mean=card["latent_mean"], std=card["latent_std"])
    else:
        autoencoder.set_latent_stats(scale=SD_LATENT_SCALE)

    text_encoder, text_config = _load_text(state, metadata, version, text_model, path)
    return SingleFile(backbone=unet, autoencoder=autoencoder, text_encoder=text_encoder,
                      text_encoder_config=text_config, version=version, prediction=prediction or found,
                      metadata=metadata)


def _load_text(state: Mapping[str, Tensor], metadata: Mapping[str, str], version: Version, text_model: str | None,
               path: str | Path) -> tuple[OpenCLIPTextEncoder | None, dict[str, Any] | None]:
    if version == "v1":
        clip = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
        if not clip:
            return None, None
        config, tower = clip_text_tower(clip_text_config(clip), clip, quick_gelu=True, text_model=text_model)
        return build_text_encoder(config, tower, path), config
    tower = {k[len(OPENCLIP_PREFIX):]: v for k, v in state.items() if k.startswith(OPENCLIP_PREFIX)}
    if not tower:
        return None, None
    recorded = json.loads(metadata["ldm.text_encoder"]) if "ldm.text_encoder" in metadata else {}
    name = text_model or recorded.get("model_name") or match_openclip_model(openclip_text_config(tower))
    config = dict(model_name=name, pretrained=None, layer=recorded.get("layer", "penultimate"), freeze=True,
                  context_length=recorded.get("context_length"))
    return build_text_encoder(config, {k: v for k, v in tower.items() if k not in _OPENCLIP_IGNORED}, path), config


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value  # tuple, ListConfig
