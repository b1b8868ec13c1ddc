"""The original single-file Stable Diffusion checkpoint (CompVis key names, one `.safetensors`) that ComfyUI and the
A1111 web UI load: our UNet, autoencoder and OpenCLIP text tower written into it, and read back out of it.

Layout: the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`, SD 2.x's OpenCLIP text tower
under `cond_stage_model.model.` in open_clip's own key names, SD 1.x's CLIP text tower under
`cond_stage_model.transformer.` in transformers' names. The key maps are ours, one function per part that names
each of our keys' CompVis counterparts, used in both directions; diffusers' `single_file_utils` converters are the
tests' independent oracle. diffusers has no writer for this layout (its `from_single_file` only reads), hence our own.

The file holds weights only. What a loader cannot see in the shapes (attention heads, the prediction type, our
latent statistics) is written into the safetensors header: the SAI model-spec keys other tools read
(`modelspec.prediction_type`, ...) and our parts' configs under `ldm.*`, which an import here prefers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from ldm.models.autoencoder.convert import convert_compvis_autoencoder
from ldm.models.autoencoder.export import card as autoencoder_card
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import CONFIG_DIR, OpenCLIPTextEncoder, register_config_dir
from ldm.models.unet.unet import UNet

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
OPENCLIP_PREFIX, CLIP_PREFIX = "cond_stage_model.model.", "cond_stage_model.transformer."
SD_LATENT_SCALE = 0.18215  # SD 1.x/2.x's `scale_factor`: implied by the format, never stored in the file
NORM_GROUPS = 32  # CompVis' `Normalize()` is GroupNorm(32, C) everywhere: the format fixes it
Prediction = Literal["eps", "v"]
Version = Literal["v1", "v2"]
_MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v"}
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")  # in released SD 2.x files; not text-tower weights we keep


# -------------------------------------------------------------------------------------------------------
# UNet: our keys -> CompVis keys
# -------------------------------------------------------------------------------------------------------

_RES = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("skip.", "skip_connection.")]
_ATTN = [(r"^blocks\.", "transformer_blocks."), (r"\.attn([12])\.out\.", r".attn\1.to_out.0."),
         (r"\.attn2\.q\.", ".attn2.to_q."), (r"\.ff\.proj\.", ".ff.net.0.proj."), (r"\.ff\.out\.", ".ff.net.2.")]
_FUSED = {".attn1.qkv.": ("to_q", "to_k", "to_v"), ".attn2.kv.": ("to_k", "to_v")}  # ours fuses, CompVis does not


def unet_key_map(keys: Iterable[str]) -> dict[str, list[str]]:
    """Each of our UNet's state-dict keys -> its CompVis key(s) (no prefix); fused projections map to 2 or 3 keys,
    stacked along dim 0 in that order."""
    keys = list(keys)
    r = len({m[1] for k in keys if (m := re.match(r"down\.0\.res\.(\d+)\.", k))})  # num_res_blocks
    up_attention = {int(m[1]) for k in keys if (m := re.match(r"up\.(\d+)\.attn\.", k))}
    return {key: _unet_key(key, r, up_attention) for key in keys}


def _unet_key(key: str, r: int, up_attention: set[int]) -> list[str]:
    def res(rest: str) -> str:
        return next((new + rest[len(old):] for old, new in _RES if rest.startswith(old)), rest)

    def attn(rest: str) -> list[str]:
        for pattern, replacement in _ATTN:
            rest = re.sub(pattern, replacement, rest)
        for fused, parts in _FUSED.items():
            if fused in rest:
                return [rest.replace(fused, f".{fused.split('.')[1]}.{p}.") for p in parts]
        return [rest]

    if m := re.fullmatch(r"time_embed\.linear_([12])\.(.*)", key):
        return [f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"]
    if m := re.fullmatch(r"(conv_in|norm_out|conv_out)\.(.*)", key):
        return [f"{ {'conv_in': 'input_blocks.0.0', 'norm_out': 'out.0', 'conv_out': 'out.2'}[m[1]] }.{m[2]}"]
    if m := re.fullmatch(r"down\.(\d+)\.(res|attn)\.(\d+)\.(.*)", key):
        block = f"input_blocks.{1 + int(m[1]) * (r + 1) + int(m[3])}"
        return [f"{block}.0.{res(m[4])}"] if m[2] == "res" else [f"{block}.1.{p}" for p in attn(m[4])]
    if m := re.fullmatch(r"down\.(\d+)\.resample\.conv\.(.*)", key):
        return [f"input_blocks.{(int(m[1]) + 1) * (r + 1)}.0.op.{m[2]}"]
    if m := re.fullmatch(r"mid\.(res_1|attn|res_2)\.(.*)", key):
        index = {"res_1": 0, "attn": 1, "res_2": 2}[m[1]]
        return [f"middle_block.{index}.{p}" for p in (attn(m[2]) if m[1] == "attn" else [res(m[2])])]
    if m := re.fullmatch(r"up\.(\d+)\.(res|attn)\.(\d+)\.(.*)", key):
        block = f"output_blocks.{int(m[1]) * (r + 1) + int(m[3])}"
        return [f"{block}.0.{res(m[4])}"] if m[2] == "res" else [f"{block}.1.{p}" for p in attn(m[4])]
    if m := re.fullmatch(r"up\.(\d+)\.resample\.conv\.(.*)", key):
        level = int(m[1])
        return [f"output_blocks.{level * (r + 1) + r}.{2 if level in up_attention else 1}.conv.{m[2]}"]
    raise ValueError(f"UNet key {key!r} has no CompVis counterpart")


def unet_to_compvis(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our UNet state dict -> CompVis keys (no prefix)."""
    out: dict[str, Tensor] = {}
    for key, targets in unet_key_map(state).items():
        for target, part in zip(targets, state[key].chunk(len(targets)), strict=True):
            out[target] = part
    return out


def unet_from_compvis(state: Mapping[str, Tensor], model: UNet, where: str = "the file") -> dict[str, Tensor]:
    """CompVis UNet weights (no prefix) -> a state dict for `model`; every key on both sides must be accounted for."""
    out, used = {}, set()
    missing = []
    for key, targets in unet_key_map(model.state_dict()).items():
        if any(t not in state for t in targets):
            missing += [t for t in targets if t not in state]
            continue
        out[key] = torch.cat([state[t] for t in targets]) if len(targets) > 1 else state[targets[0]]
        used.update(targets)
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        raise ValueError(f"The UNet in {where} does not fit the UNet {model.config}: missing {missing[:4]} "
                         f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}).")
    return out


def unet_kwargs_from_compvis(state: Mapping[str, Tensor], *, version: Version, num_heads: int | None = None,
                             head_channels: int | None = None) -> dict[str, Any]:
    """Our UNet's constructor kwargs from the shapes of CompVis UNet weights (no prefix).

    The heads are not in the shapes: SD 1.x has 8 heads per level, SD 2.x 64-channel heads (their `v1-inference` /
    `v2-inference` yamls); pass `num_heads` or `head_channels` for other models.
    """
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise ValueError("no CompVis UNet: expected input_blocks.0.0.weight and out.2.weight under "
                         f"{UNET_PREFIX}, found {sorted(state)[:6]}")
    for key in ("label_emb.0.0.weight", "label_emb.weight"):
        if key in state:
            raise ValueError(f"the UNet has {key} (SDXL, an upscaler or a class-conditional model): only SD 1.x/2.x "
                             "text-to-image UNets are supported")
    base = int(state["input_blocks.0.0.weight"].shape[0])
    blocks = sorted({int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    ops = sorted({int(m[1]) for k in state if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    r = ops[0] - 1 if ops else blocks[-1]
    levels = len(ops) + 1
    widths = [int(state[f"input_blocks.{1 + level * (r + 1)}.0.out_layers.3.weight"].shape[0])
              for level in range(levels)]
    attention = [level for level in range(levels) if f"input_blocks.{1 + level * (r + 1)}.1.proj_in.weight" in state]
    depth = len({m[1] for k in state if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))})
    context = int(next(v for k, v in state.items() if k.endswith("attn2.to_k.weight")).shape[1])
    if num_heads is None and head_channels is None:
        num_heads, head_channels = (8, None) if version == "v1" else (None, 64)
    attending = [widths[level] for level in attention] + [widths[-1]]
    if any(w % (head_channels or num_heads) for w in attending):
        raise ValueError(f"attention widths {attending} do not split into "
                         f"{f'{head_channels}-channel heads' if head_channels else f'{num_heads} heads'} "
                         "(the file does not record heads); pass num_heads=N or head_channels=N")
    return dict(in_channels=int(state["input_blocks.0.0.weight"].shape[1]),
                out_channels=int(state["out.2.weight"].shape[0]), model_channels=base,
                channel_mult=[w // base for w in widths], num_res_blocks=r, attention_levels=attention,
                num_heads=num_heads if head_channels is None else None, head_channels=head_channels,
                transformer_depth=depth, context_dim=context,
                use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2, dropout=0.0,
                norm_groups=NORM_GROUPS)


# -------------------------------------------------------------------------------------------------------
# Autoencoder: ours -> CompVis (the way in is `convert_compvis_autoencoder`)
# -------------------------------------------------------------------------------------------------------

_LATENT_BUFFERS = ("latent_scale", "latent_mean", "latent_std", "latent_stats_set")


def autoencoder_to_compvis(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our autoencoder's state dict -> CompVis keys (no prefix), the inverse of `convert_compvis_autoencoder`;
    the latent statistics are not weights of the format and are left out."""
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _LATENT_BUFFERS:
            continue
        # CompVis numbers decoder levels by resolution (0 = full size); ours run in execution order.
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
        key = re.sub(r"\.blocks\.(\d+)\.", r".block.\1.", key).replace(".shortcut.", ".nin_shortcut.")
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn\.(norm|qkv|proj)\.(weight|bias)", key):
            prefix = f"{m[1]}.mid.attn_1."
            if m[2] == "norm":
                out[prefix + f"norm.{m[3]}"] = value
                continue
            names = ("q", "k", "v") if m[2] == "qkv" else ("proj_out",)
            for name, part in zip(names, value.chunk(len(names)), strict=True):  # 1x1 convs in CompVis
                out[prefix + f"{name}.{m[3]}"] = part[..., None, None] if m[3] == "weight" else part
            continue
        out[key] = value
    return out


def autoencoder_kwargs_from_compvis(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Our autoencoder's constructor kwargs from the shapes of CompVis VAE weights (no prefix)."""
    if "encoder.conv_in.weight" not in state or "decoder.conv_in.weight" not in state:
        raise ValueError(f"no CompVis VAE: expected encoder.conv_in.weight and decoder.conv_in.weight under "
                         f"{VAE_PREFIX}, found {sorted(state)[:6]}")
    base = int(state["encoder.conv_in.weight"].shape[0])
    levels = 1 + max(int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    blocks = {m[1] for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return dict(in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                out_channels=int(state["decoder.conv_out.weight"].shape[0]), base_channels=base,
                channel_mult=[w // base for w in widths], num_res_blocks=len(blocks),
                latent_channels=int(state["decoder.conv_in.weight"].shape[1]),
                mid_attention="encoder.mid.attn_1.q.weight" in state, norm_groups=NORM_GROUPS,
                use_quant_conv="quant_conv.weight" in state, latent_norm="scale")


# -------------------------------------------------------------------------------------------------------
# Text encoders
# -------------------------------------------------------------------------------------------------------


def openclip_text_config(state: Mapping[str, Tensor]) -> dict[str, int]:
    """The open_clip text config the shapes of a text tower (open_clip keys, no prefix) fix; heads excepted."""
    layers = {int(m[1]) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    vocab, width = state["token_embedding.weight"].shape
    proj = state.get("text_projection")
    return dict(context_length=int(state["positional_embedding"].shape[0]), vocab_size=int(vocab), width=int(width),
                layers=len(layers), embed_dim=int(proj.shape[1]) if proj is not None else int(width))


def match_openclip_model(text_cfg: Mapping[str, Any], quick_gelu: bool = False) -> str:
    """The registered open_clip architecture whose text tower has these sizes (and activation): ViT-H-14 for SD 2.x.
    Heads are not in the shapes; every registered tower of one width shares its head count, so the match fixes them."""
    register_config_dir(CONFIG_DIR)
    preferred = ["ViT-H-14", "ViT-L-14", "ViT-bigG-14", "ViT-B-32", "ldm-tiny-text"]
    names = [n for n in preferred if n in open_clip.list_models()] + sorted(open_clip.list_models())
    for name in dict.fromkeys(names):
        cfg = open_clip.get_model_config(name)
        text = cfg.get("text_cfg", {})
        if text.get("hf_model_name") or text.get("embed_cls") or bool(cfg.get("quick_gelu")) != quick_gelu:
            continue
        sizes = dict(context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
                     width=text.get("width"), layers=text.get("layers"), embed_dim=cfg.get("embed_dim"))
        if all(sizes[k] == text_cfg[k] for k in sizes):
            return name
    raise ValueError(f"no registered open_clip architecture has a text tower of {dict(text_cfg)} "
                     f"(quick_gelu={quick_gelu}); register an open_clip json config of it with "
                     "open_clip.add_model_config and pass text_model=<its name>")


def sd1_text_encoder(config: Mapping[str, Any], state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SD 1.x's CLIP text tower (transformers' `CLIPTextModel` names) -> (open_clip text config, our tower's state).
    The conversion is `ldm.models.text_encoder.convert.clip_text_to_openclip`, written on another branch."""
    try:
        from ldm.models.text_encoder.convert import clip_text_to_openclip  # type: ignore[import-not-found]
    except ImportError as error:
        raise NotImplementedError(
            "CLIP text towers in transformers' layout (SD 1.x single files, diffusers text_encoder/ folders) need "
            "ldm.models.text_encoder.convert.clip_text_to_openclip, which this installation lacks") from error
    return clip_text_to_openclip(config, state)


def clip_text_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` dict from the shapes of SD 1.x's text tower (CLIP ViT-L/14: 64-channel heads,
    quick GELU)."""
    prefix = "text_model."
    vocab, width = state[prefix + "embeddings.token_embedding.weight"].shape
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    return dict(vocab_size=int(vocab), hidden_size=int(width), num_hidden_layers=len(layers),
                num_attention_heads=int(width) // 64, hidden_act="quick_gelu",
                intermediate_size=int(state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
                max_position_embeddings=int(state[prefix + "embeddings.position_embedding.weight"].shape[0]))


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


def single_file_state(backbone: UNet, autoencoder: AutoencoderKL,
                      text_encoder: OpenCLIPTextEncoder | None = None) -> dict[str, Tensor]:
    """Our parts -> one state dict in the CompVis single-file layout (SD 2.x text tower: open_clip keys)."""
    check_exportable(backbone, autoencoder, text_encoder)
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
    check_exportable(backbone, autoencoder, text_encoder, latent_scale=latent_scale_check)
    state = single_file_state(backbone, autoencoder, text_encoder)
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
    recorded = json.loads(metadata["ldm.backbone"]) if "ldm.backbone" in metadata else {}
    if recorded and num_heads is None and head_channels is None:
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
        text_cfg, text_state = sd1_text_encoder(clip_text_config(clip), clip)
        name = text_model or match_openclip_model(
            {**{k: text_cfg.get(k) for k in ("context_length", "vocab_size", "width", "layers")},
             "embed_dim": text_cfg.get("embed_dim", text_cfg.get("width"))}, quick_gelu=True)
        config = dict(model_name=name, pretrained=None, layer="last", freeze=True)
        return _build_text(config, {k.removeprefix("text."): v for k, v in text_state.items()}, path), config
    tower = {k[len(OPENCLIP_PREFIX):]: v for k, v in state.items() if k.startswith(OPENCLIP_PREFIX)}
    if not tower:
        return None, None
    recorded = json.loads(metadata["ldm.text_encoder"]) if "ldm.text_encoder" in metadata else {}
    name = text_model or recorded.get("model_name") or match_openclip_model(openclip_text_config(tower))
    config = dict(model_name=name, pretrained=None, layer=recorded.get("layer", "penultimate"), freeze=True,
                  context_length=recorded.get("context_length"))
    return _build_text(config, {k: v for k, v in tower.items() if k not in _OPENCLIP_IGNORED}, path), config


def _build_text(config: Mapping[str, Any], tower: Mapping[str, Tensor], path: str | Path) -> OpenCLIPTextEncoder:
    encoder = OpenCLIPTextEncoder(**config)
    expected = encoder.text.state_dict()
    tower = dict(tower)
    if "positional_embedding" in tower:  # a shorter context keeps the first positions (causal attention)
        tower["positional_embedding"] = tower["positional_embedding"][: expected["positional_embedding"].shape[0]]
    missing, unexpected = sorted(set(expected) - set(tower)), sorted(set(tower) - set(expected))
    wrong = [k for k in expected if k in tower and tower[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"The text tower in {path} does not fit open_clip {config['model_name']}: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]}.")
    encoder.text.load_state_dict(tower, strict=True)
    return encoder


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str) \
        else value
