"""Load diffusers and CompVis (Stable Diffusion) `AutoencoderKL` weights into our `AutoencoderKL`.

Real SD weights, e.g. the `vae/` folder of a diffusers repo (`config.json` + `diffusion_pytorch_model.safetensors`),
or `stabilityai/sd-vae-ft-mse`, downloaded on a machine with internet:

    model = load_diffusers_autoencoder("/path/to/sd-vae-ft-mse")     # reads config + weights, sets latent_scale

or by hand, from any state dict:

    kwargs = autoencoder_kwargs_from_diffusers_config(config)        # constructor kwargs, e.g. for a YAML file
    model = AutoencoderKL(**kwargs)
    model.load_state_dict(convert_diffusers_autoencoder(state_dict, config), strict=True)

and the other way, for diffusers' `AutoencoderKL(**config)` + `load_state_dict(strict=True)` or `save_pretrained`:

    config, state_dict = autoencoder_to_diffusers(model)             # latent statistics in the config

An original CompVis checkpoint (`first_stage_model.*` inside an SD `.ckpt`, or a bare VAE `.ckpt` such as
`vae-ft-mse-840000-ema-pruned.ckpt`) goes through `convert_compvis_autoencoder(state_dict)` instead; build the
model with `PRESETS["kl_f8_c4"]` and set `latent_scale` to 0.18215 with `set_latent_stats(scale=0.18215)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.models.autoencoder.kl import AutoencoderKL

# (pattern, replacement) applied in order to each diffusers key. Attention q/k/v are renamed here and fused
# into our single `qkv` projection afterwards; `query/key/value/proj_attn` is the pre-0.14 diffusers naming.
_DIFFUSERS_RULES: list[tuple[str, str]] = [
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.blocks.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r".up.\1.blocks.\2."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn.norm."),
    (r"\.mid_block\.attentions\.0\.(?:to_q|query)\.", ".mid.attn.q."),
    (r"\.mid_block\.attentions\.0\.(?:to_k|key)\.", ".mid.attn.k."),
    (r"\.mid_block\.attentions\.0\.(?:to_v|value)\.", ".mid.attn.v."),
    (r"\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", ".mid.attn.proj."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]

_COMPVIS_RULES: list[tuple[str, str]] = [
    (r"\.block\.(\d+)\.", r".blocks.\1."),
    (r"\.nin_shortcut\.", ".shortcut."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid.attn.proj."),
    (r"\.mid\.attn_1\.", ".mid.attn."),
]

# Our key -> diffusers key, the inverse of _DIFFUSERS_RULES (the fused mid-block qkv is split afterwards).
_INVERSE_RULES: list[tuple[str, str]] = [
    (r"\.down\.(\d+)\.blocks\.(\d+)\.", r".down_blocks.\1.resnets.\2."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.up\.(\d+)\.blocks\.(\d+)\.", r".up_blocks.\1.resnets.\2."),
    (r"\.up\.(\d+)\.upsample\.", r".up_blocks.\1.upsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.qkv\.", ".mid_block.attentions.0.qkv."),
    (r"\.mid\.attn\.proj\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]
_LATENT_BUFFERS = ("latent_scale", "latent_mean", "latent_std", "latent_stats_set")

_MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def autoencoder_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `AutoencoderKL` config (its `config.json`) -> our constructor kwargs."""
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"only act_fn='silu' is supported, got {config['act_fn']!r}")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != allowed for t in config.get(key, ())):
            raise ValueError(f"only {allowed} blocks are supported in {key}, got {config[key]}")
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        raise ValueError("use_quant_conv and use_post_quant_conv must agree (both True or both False)")
    widths = [int(w) for w in config["block_out_channels"]]
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels must be multiples of the first entry, got {widths}")
    channel_wise = config.get("shift_factor") is not None or config.get("latents_mean") is not None
    return dict(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(config.get("layers_per_block", 1)),
        latent_channels=int(config.get("latent_channels", 4)),
        mid_attention=bool(config.get("mid_block_add_attention", True)),
        norm_groups=int(config.get("norm_num_groups", 32)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        latent_norm="channel" if channel_wise else "scale",
    )


def convert_diffusers_autoencoder(state_dict: Mapping[str, Tensor],
                                  config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict -> ours, ready for `load_state_dict(strict=True)`.

    With `config`, the latent statistics (`scaling_factor`, `shift_factor`, `latents_mean/std`) are filled in
    for the `latent_norm` that `autoencoder_kwargs_from_diffusers_config` picks; without it they stay unset.
    """
    out = {_rename(key, _DIFFUSERS_RULES): value for key, value in state_dict.items()}
    return _finish(out, config)


def convert_compvis_autoencoder(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original LDM/SD `AutoencoderKL` state dict (optionally under `first_stage_model.` or `vae.`) -> ours."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    # Drop what is not the autoencoder itself (`loss.*` of the training checkpoints, EMA copies, ...).
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(_MODEL_PREFIXES)}
    levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out = {}
    for key, value in state_dict.items():
        # CompVis numbers decoder levels by resolution (0 = full size); ours run in execution order.
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", key)
        out[_rename(key, _COMPVIS_RULES)] = value
    return _finish(out, None)


def autoencoder_to_diffusers(model: AutoencoderKL, sample_size: int | None = None
                             ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Our `AutoencoderKL` -> (diffusers `AutoencoderKL` config, state dict): the inverse of
    `autoencoder_kwargs_from_diffusers_config` + `convert_diffusers_autoencoder`.

    The latent statistics go into the config the way diffusers writes them: `latent_norm="scale"` as
    `scaling_factor` (SD: z * 0.18215); `"channel"` with one mean and one std for all channels as SD3's
    `(z - shift_factor) * scaling_factor`; per-channel ones as `latents_mean` / `latents_std` with `scaling_factor`
    (SDXL / Playground's `(z - mean) * scaling_factor / std`). Pipelines differ in which of these they read:
    StableDiffusionPipeline only applies `scaling_factor` (see `latent_norm_for_sd_pipeline`).
    """
    if not isinstance(model, AutoencoderKL):
        raise ValueError(f"autoencoder_to_diffusers takes an ldm AutoencoderKL, got {type(model).__name__}")
    c = model.config
    n = len(c["channel_mult"])
    config: dict[str, Any] = dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"],
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[c["base_channels"] * m for m in c["channel_mult"]],
        layers_per_block=c["num_res_blocks"], act_fn="silu", latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_groups"], mid_block_add_attention=c["mid_attention"],
        use_quant_conv=c["use_quant_conv"], use_post_quant_conv=c["use_quant_conv"],
        force_upcast=True, **_latent_config(model),
    )  # `dropout` (training only) has no diffusers counterpart and is dropped
    if sample_size is not None:  # the image side diffusers' tiling and default sizes assume
        config["sample_size"] = sample_size
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in _LATENT_BUFFERS:
            continue
        key = _rename(key, _INVERSE_RULES)
        if ".qkv." in key:
            names = [key.replace(".qkv.", f".to_{x}.") for x in "qkv"]
            state.update(zip(names, value.chunk(3), strict=True))
        else:
            state[key] = value
    return config, {k: v.detach().clone().contiguous() for k, v in state.items()}


def latent_norm_for_sd_pipeline(config: Mapping[str, Any]) -> str | None:
    """None when StableDiffusionPipeline decodes latents of this diffusers VAE config as ldm does (it divides by
    `scaling_factor` only), else what it would ignore."""
    ignored = [k for k in ("shift_factor", "latents_mean", "latents_std") if config.get(k) is not None]
    return None if not ignored else f"{', '.join(ignored)} (StableDiffusionPipeline applies only scaling_factor)"


def load_diffusers_autoencoder(directory: str | Path) -> AutoencoderKL:
    """Build an `AutoencoderKL` from a local diffusers folder (`config.json` + weights)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    weights = sorted(directory.glob("diffusion_pytorch_model*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no diffusion_pytorch_model*.safetensors or *.bin file in {directory}")
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(weights[0])
    else:
        state_dict = torch.load(weights[0], map_location="cpu", weights_only=True)
    model = AutoencoderKL(**autoencoder_kwargs_from_diffusers_config(config))
    model.load_state_dict(convert_diffusers_autoencoder(state_dict, config), strict=True)
    return model


# -------------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------------


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    key = "." + key  # lets every rule anchor on a leading dot
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key[1:]


def _as_linear(weight: Tensor) -> Tensor:
    # CompVis and old diffusers store attention projections as 1x1 convs (out, in, 1, 1).
    return weight.reshape(weight.shape[0], -1) if weight.ndim > 2 else weight


def _latent_config(model: AutoencoderKL) -> dict[str, Any]:
    scale = float(model.latent_scale)
    none = dict(shift_factor=None, latents_mean=None, latents_std=None)
    if model.latent_norm == "scale":
        return dict(none, scaling_factor=scale)
    mean, std = model.latent_mean.float(), model.latent_std.float()
    if bool((std == std[0]).all()) and bool((mean == mean[0]).all()):
        # (z - m) / s * scale = (z - shift) * scaling with shift = m, scaling = scale / s; no shift when m = 0
        shift = float(mean[0]) or None
        return dict(none, scaling_factor=scale / float(std[0]), shift_factor=shift)
    return dict(none, scaling_factor=scale, latents_mean=mean.tolist(), latents_std=std.tolist())


def _finish(sd: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Tensor]:
    for part in ("encoder", "decoder"):
        prefix = f"{part}.mid.attn."
        if f"{prefix}q.weight" not in sd:
            continue  # mid_attention=False
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{prefix}{name}.{kind}") for name in "qkv"]
            sd[f"{prefix}qkv.{kind}"] = torch.cat([_as_linear(p) for p in parts])
        sd[f"{prefix}proj.weight"] = _as_linear(sd[f"{prefix}proj.weight"])
    sd.update(_latent_buffers(sd["decoder.conv_in.weight"].shape[1], config))
    return sd


def _latent_buffers(channels: int, config: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """Our latent-statistics buffers from a diffusers config (see `AutoencoderKL` for the conventions)."""
    scale, mean, std = torch.tensor(1.0), torch.zeros(channels), torch.ones(channels)
    if config is not None:
        scale = torch.tensor(float(config.get("scaling_factor", 1.0)))
        if config.get("latents_mean") is not None:
            mean = torch.tensor(config["latents_mean"], dtype=torch.float32).flatten()
            std = torch.tensor(config["latents_std"], dtype=torch.float32).flatten()
        elif config.get("shift_factor") is not None:
            mean = torch.full((channels,), float(config["shift_factor"]))
    return dict(latent_scale=scale, latent_mean=mean, latent_std=std,
                latent_stats_set=torch.tensor(config is not None))
