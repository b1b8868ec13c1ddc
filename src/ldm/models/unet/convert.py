"""Load diffusers `UNet2DConditionModel` weights (Stable Diffusion 1.x / 2.x layout) into our `UNet`.

A real SD 2.x UNet is the `unet/` folder of a diffusers repo such as `stabilityai/stable-diffusion-2-1-base`
(`config.json` + `diffusion_pytorch_model.safetensors`), downloaded on a machine with internet, e.g.
`huggingface-cli download stabilityai/stable-diffusion-2-1-base --include "unet/*" --local-dir sd21`:

    model = load_diffusers_unet("sd21/unet")                      # reads config + weights, strict load

or by hand, from any diffusers state dict and config:

    kwargs = unet_kwargs_from_diffusers_config(config)             # for SD 2.x: conf/model/backbone/unet_sd2.yaml
    model = UNet(**kwargs)
    model.load_state_dict(convert_diffusers_unet(state_dict), strict=True)

The other way, for diffusers' `UNet2DConditionModel(**config)` + `load_state_dict(strict=True)` or `save_pretrained`:

    config, state_dict = unet_to_diffusers(model)                  # exact inverse of convert_diffusers_unet

An original CompVis checkpoint (`v2-1_512-ema-pruned.ckpt`, keys `model.diffusion_model.*`) first goes through
diffusers' `diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint(state_dict, config)` (`config`: the
matching diffusers `unet/config.json`) and then through `convert_diffusers_unet`. SD 2.x is an eps (512 px `-base`) or v (768 px) model on the "scaled_linear" DDPM
schedule with integer timesteps as `c_noise`; that part is the parameterization's job, not the UNet's. SD 2.1's
`upcast_attention: true` needs no counterpart: SDPA's fused kernels already keep the softmax in fp32.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.models.unet.unet import UNet

# (pattern, replacement) applied in order to each diffusers key (with a leading dot to anchor on).
_RULES: list[tuple[str, str]] = [
    (r"^\.time_embedding\.", ".time_embed."),
    (r"^\.conv_norm_out\.", ".norm_out."),
    (r"^\.(down|up)_blocks\.(\d+)\.resnets\.", r".\1.\2.res."),
    (r"^\.(down|up)_blocks\.(\d+)\.attentions\.", r".\1.\2.attn."),
    (r"^\.(down|up)_blocks\.(\d+)\.(?:down|up)samplers\.0\.", r".\1.\2.resample."),
    (r"^\.mid_block\.resnets\.0\.", ".mid.res_1."),
    (r"^\.mid_block\.resnets\.1\.", ".mid.res_2."),
    (r"^\.mid_block\.attentions\.0\.", ".mid.attn."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.(attn[12])\.to_out\.0\.", r".\1.out."),
    (r"\.attn2\.to_q\.", ".attn2.q."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]

# Our key -> diffusers key, the inverse of _RULES (qkv / kv are split afterwards).
_INVERSE_RULES: list[tuple[str, str]] = [
    (r"^\.time_embed\.", ".time_embedding."),
    (r"^\.norm_out\.", ".conv_norm_out."),
    (r"^\.(down|up)\.(\d+)\.res\.", r".\1_blocks.\2.resnets."),
    (r"^\.(down|up)\.(\d+)\.attn\.", r".\1_blocks.\2.attentions."),
    (r"^\.(down|up)\.(\d+)\.resample\.", r".\1_blocks.\2.\1samplers.0."),
    (r"^\.mid\.res_1\.", ".mid_block.resnets.0."),
    (r"^\.mid\.res_2\.", ".mid_block.resnets.1."),
    (r"^\.mid\.attn\.", ".mid_block.attentions.0."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"\.blocks\.", ".transformer_blocks."),
    (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
    (r"\.attn2\.q\.", ".attn2.to_q."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
]

# Config entries whose other values would change the function; each must keep this (diffusers default) value.
_FIXED: dict[str, Any] = dict(
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, downsample_padding=1,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
    time_cond_proj_dim=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, conv_in_kernel=3, conv_out_kernel=3, class_embed_type=None, num_class_embeds=None,
    addition_embed_type=None, encoder_hid_dim=None, only_cross_attention=False, dual_cross_attention=False,
    attention_type="default", cross_attention_norm=None, reverse_transformer_layers_per_block=None,
)


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` config (its `config.json`) -> our constructor kwargs.

    diffusers' `attention_head_dim` is, for historical reasons, the number of heads per level (SD2's [5, 10, 20,
    20] on 320/640/1280 channels means 64-channel heads); it becomes `head_channels` when the head width is the
    same at every attending level, else `num_heads` when the count is.
    """
    for key, expected in _FIXED.items():
        value = config.get(key, expected)
        if any(v != expected for v in (value if isinstance(value, list | tuple) else [value])):
            raise ValueError(f"unsupported {key}={value!r}; only {expected!r} is supported")
    widths = [int(w) for w in config["block_out_channels"]]
    n, base = len(widths), widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels must be multiples of the first entry, got {widths}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != n or len(up) != n:
        raise ValueError(f"need {n} down and up block types, got {down} / {up}")
    attention_levels = []
    for level in range(n):
        d, u = down[level], up[n - 1 - level]
        if (d, u) not in (("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")):
            raise ValueError(f"level {level}: expected CrossAttnDownBlock2D/CrossAttnUpBlock2D or DownBlock2D/"
                             f"UpBlock2D as mirror images, got {d} / {u}")
        attention_levels += [level] if d.startswith("CrossAttn") else []
    # The mid block attends at the last level's width with that level's head count.
    attending = attention_levels + ([n - 1] if n - 1 not in attention_levels else [])
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n, "heads")
    head_channels = {widths[i] // heads[i] for i in attending}
    num_heads = {heads[i] for i in attending}
    if len(head_channels) == 1 and len(num_heads) > 1:
        heads_kwargs = dict(num_heads=None, head_channels=head_channels.pop())
    elif len(num_heads) == 1:
        heads_kwargs = dict(num_heads=num_heads.pop(), head_channels=None)
    else:
        raise ValueError(f"heads {heads} on widths {widths}: neither the head count nor the head width is constant")
    depth = set(_per_level(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"))
    layers = set(_per_level(config.get("layers_per_block", 2), n, "layers_per_block"))
    if len(depth) != 1 or len(layers) != 1:
        raise ValueError("transformer_layers_per_block and layers_per_block must be the same at every level")
    context_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        raise ValueError(f"cross_attention_dim must be one int, got {context_dim!r}")
    return dict(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=layers.pop(),
        attention_levels=tuple(attention_levels),
        **heads_kwargs,
        transformer_depth=depth.pop(),
        context_dim=context_dim,
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        dropout=float(config.get("dropout", 0.0)),
        norm_groups=int(config.get("norm_num_groups", 32)),
    )


def convert_diffusers_unet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `UNet2DConditionModel` state dict -> ours, ready for `load_state_dict(strict=True)`.

    Self-attention q/k/v are concatenated into our fused `qkv` projection, cross-attention k/v into `kv`.
    """
    sd = {_rename(key): value for key, value in state_dict.items()}
    for key in [k for k in sd if k.endswith(".attn1.to_q.weight")]:
        prefix = key[: -len("to_q.weight")]
        sd[prefix + "qkv.weight"] = torch.cat([sd.pop(f"{prefix}to_{c}.weight") for c in "qkv"])
    for key in [k for k in sd if k.endswith(".attn2.to_k.weight")]:
        prefix = key[: -len("to_k.weight")]
        sd[prefix + "kv.weight"] = torch.cat([sd.pop(f"{prefix}to_{c}.weight") for c in "kv"])
    return sd


def unet_to_diffusers(model: UNet, sample_size: int | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Our `UNet` -> (diffusers `UNet2DConditionModel` config, state dict): the inverse of
    `unet_kwargs_from_diffusers_config` + `convert_diffusers_unet` (every tensor unchanged, q/k/v split).

    `sample_size` (the latent side) only sets diffusers' default output size. The head count goes out as SD does,
    one `attention_head_dim` entry per level (the mid block uses the last level's).
    """
    if not isinstance(model, UNet):
        raise ValueError(f"unet_to_diffusers takes an ldm UNet, got {type(model).__name__}; transformers go through "
                         "ldm.models.convert_transformers (dit_to_diffusers / mmdit_to_diffusers)")
    c = model.config
    widths = [c["model_channels"] * m for m in c["channel_mult"]]
    n, attending = len(widths), set(c["attention_levels"])
    down = ["CrossAttnDownBlock2D" if i in attending else "DownBlock2D" for i in range(n)]
    up = ["CrossAttnUpBlock2D" if i in attending else "UpBlock2D" for i in reversed(range(n))]
    # heads per level; a non-attending level's entry is unused by diffusers but must be a positive int
    heads = [c["num_heads"] or max(1, w // c["head_channels"]) for w in widths]
    config: dict[str, Any] = dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"],
        down_block_types=down, up_block_types=up, block_out_channels=widths, layers_per_block=c["num_res_blocks"],
        attention_head_dim=heads, transformer_layers_per_block=c["transformer_depth"],
        cross_attention_dim=c["context_dim"], use_linear_projection=c["use_linear_projection"],
        dropout=c["dropout"], norm_num_groups=c["norm_groups"], **_FIXED,
    )
    if sample_size is not None:
        config["sample_size"] = sample_size
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        key = _rename(key, _INVERSE_RULES)
        if key.endswith(".attn1.qkv.weight"):
            state.update(zip((key.replace("qkv", f"to_{x}") for x in "qkv"), value.chunk(3), strict=True))
        elif key.endswith(".attn2.kv.weight"):
            state.update(zip((key.replace("kv", f"to_{x}") for x in "kv"), value.chunk(2), strict=True))
        else:
            state[key] = value
    return config, {k: v.detach().clone().contiguous() for k, v in state.items()}


def read_diffusers_folder(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A local diffusers model folder's `config.json` and its weights (safetensors, or `.bin` loaded weights-only;
    sharded checkpoints come as several files)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    weights = sorted(directory.glob("diffusion_pytorch_model*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"no diffusion_pytorch_model*.safetensors or *.bin file in {directory}")
    state_dict: dict[str, Tensor] = {}
    for path in weights:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict.update(load_file(path))
        else:
            state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
    return config, state_dict


def load_diffusers_unet(directory: str | Path, **overrides: Any) -> UNet:
    """Build a `UNet` from a local diffusers folder (`config.json` + weights); `overrides` go to the constructor."""
    config, state_dict = read_diffusers_folder(directory)
    model = UNet(**{**unet_kwargs_from_diffusers_config(config), **overrides})
    model.load_state_dict(convert_diffusers_unet(state_dict), strict=True)
    return model


# -------------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------------


def _rename(key: str, rules: list[tuple[str, str]] = _RULES) -> str:
    key = "." + key
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key[1:]


def _per_level(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per level ({n}), got {value!r}")
    return values
