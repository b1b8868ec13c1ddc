"""Stable Diffusion's original (CompVis `ldm`) key names and our parts: for each of our UNet's and autoencoder's keys
its CompVis counterpart(s), used in both directions; our configs from CompVis tensor shapes; the text towers'
layouts (SD 2.x: open_clip's own names, SD 1.x: transformers' CLIP names). diffusers has no writer for these names
(its single-file support only reads), hence our own maps; its readers are the tests' oracle.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from ldm.models.text_encoder.openclip import CONFIG_DIR, OpenCLIPTextEncoder, register_config_dir
from ldm.models.unet.unet import UNet

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
OPENCLIP_PREFIX, CLIP_PREFIX = "cond_stage_model.model.", "cond_stage_model.transformer."
NORM_GROUPS = 32  # CompVis' `Normalize()` is GroupNorm(32, C) everywhere: the format fixes it
Version = Literal["v1", "v2"]


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
    """The registered open_clip architecture whose text tower has these sizes (and activation): ViT-H-14 for SD 2.x,
    ViT-L-14-quickgelu for SD 1.x's CLIP. Heads are not in the shapes: the first match, SD's towers first, fixes them
    (open_clip's towers of one width share a head count)."""
    register_config_dir(CONFIG_DIR)
    preferred = ["ViT-H-14", "ViT-L-14-quickgelu", "ViT-L-14", "ViT-bigG-14", "ViT-B-32", "ldm-tiny-text"]
    names = [n for n in preferred if n in open_clip.list_models()] + sorted(open_clip.list_models())
    for name in dict.fromkeys(names):
        cfg = open_clip.get_model_config(name)
        text = cfg.get("text_cfg", {})
        if text.get("hf_model_name") or text.get("embed_cls") or bool(cfg.get("quick_gelu")) != quick_gelu:
            continue
        sizes = dict(context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
                     width=text.get("width"), layers=text.get("layers"), embed_dim=cfg.get("embed_dim"))
        if all(sizes[k] == text_cfg[k] for k in sizes if k in text_cfg):  # embed_dim left out: any projection
            return name
    raise ValueError(f"no registered open_clip architecture has a text tower of {dict(text_cfg)} "
                     f"(quick_gelu={quick_gelu}); register an open_clip json config of it with "
                     "open_clip.add_model_config and pass text_model=<its name>")


def clip_text_tower(config: Mapping[str, Any], state: Mapping[str, Tensor], *, quick_gelu: bool,
                    text_model: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers `CLIPTextModel` (SD 1.x's tower in a single file; any diffusers `text_encoder/`) -> (our
    `OpenCLIPTextEncoder` config, its tower's state), through `ldm.models.text_encoder.convert.clip_text_to_openclip`.

    Whose token states are the model's `last_hidden_state`: a registered open_clip architecture of the same sizes
    read at its last layer (SD 1.x: ViT-L-14-quickgelu); or, for SD 2.x's tower, which diffusers stores one block
    short of OpenCLIP ViT-H-14 (SD 2.x conditions on the penultimate block), ViT-H-14 read at its penultimate layer,
    whose last block is then never run (zeros stand in for the weights the release does not have)."""
    from ldm.models.text_encoder.convert import clip_text_to_openclip

    openclip_config, tower = clip_text_to_openclip(config, state)
    sizes = {k: openclip_config["text_cfg"][k] for k in ("context_length", "vocab_size", "width", "layers")}
    projected = any(k.removeprefix("text_model.") == "text_projection.weight" for k in state)
    if projected:  # a CLIPTextModelWithProjection: the pooled embedding is real, its size must match too
        sizes["embed_dim"] = openclip_config["embed_dim"]
    layer = "last"
    try:
        name = text_model or match_openclip_model(sizes, quick_gelu=quick_gelu)
    except ValueError as error:
        try:  # SD 2.x: one block fewer than a registered tower, read at its penultimate layer
            name = match_openclip_model({**sizes, "layers": sizes["layers"] + 1}, quick_gelu=quick_gelu)
        except ValueError:
            raise error from None
        last, layer = f"transformer.resblocks.{sizes['layers']}.", "penultimate"
        tower = {**tower, **{k.replace("transformer.resblocks.0.", last): torch.zeros_like(v)
                             for k, v in tower.items() if k.startswith("transformer.resblocks.0.")}}
    if not projected:  # no projection in a plain CLIPTextModel: a zero one of the architecture's size (pooled = 0)
        tower["text_projection"] = torch.zeros(sizes["width"], open_clip.get_model_config(name)["embed_dim"])
    return dict(model_name=name, pretrained=None, layer=layer, freeze=True), tower


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


def build_text_encoder(config: Mapping[str, Any], tower: Mapping[str, Tensor],
                       path: str | Path) -> OpenCLIPTextEncoder:
    """Our OpenCLIP text encoder of `config` holding the text-tower weights `tower` (open_clip names), or a clear
    error naming what does not fit."""
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
