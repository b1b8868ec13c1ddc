"""Convert diffusers' `PixArtTransformer2DModel` <-> our `DiT` and `SD3Transformer2DModel` <-> our `MMDiT`: configs
and state dicts, both ways, exactly (q/k/v are fused here and split there; nothing else changes value).

A diffusers model folder (`config.json` + `diffusion_pytorch_model*.safetensors`, e.g. the `transformer/` folder of
`PixArt-alpha/PixArt-XL-2-512x512` or `stabilityai/stable-diffusion-3-medium-diffusers`, fetched on a machine with
internet) loads with

    model = load_diffusers_transformer("sd3/transformer")              # DiT or MMDiT, by config `_class_name`

or by hand, from any diffusers config dict and state dict:

    model = dit_from_diffusers(config, state_dict)                     # or mmdit_from_diffusers
    model = DiT(**dit_kwargs_from_diffusers_config(config))            # the same in two steps
    model.load_state_dict(convert_diffusers_dit(state_dict), strict=True)

and the other way, for diffusers' pipelines or `save_pretrained`:

    config, state_dict = dit_to_diffusers(model)                       # or mmdit_to_diffusers
    theirs = PixArtTransformer2DModel(**config)
    theirs.load_state_dict(state_dict, strict=True)

Not covered (refused by name): PixArt-alpha's 1024 px resolution/aspect-ratio embeddings (`use_additional_conditions`)
and SD3.5's dual-attention layers. What the timesteps mean (PixArt: DDPM steps 0..999; SD3: flow-matching t * 1000)
is the diffusion process's business, not the converter's. SD3 stores its sin-cos table in the checkpoint
(`pos_embed.pos_embed`); ours is computed, and `mmdit_from_diffusers` checks the two agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.unet.convert import read_diffusers_folder

Pairs = list[tuple[str, tuple[str, ...]]]  # (our key, the diffusers keys concatenated along dim 0 to make it)

# diffusers' constructor defaults (a config.json lists every key, hand-written configs may not).
_PIXART_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
    use_additional_conditions=None, caption_channels=None, attention_type="default",
)
_PIXART_FIXED = ("dropout", "attention_bias", "activation_fn", "norm_type", "norm_elementwise_affine", "norm_eps",
                 "attention_type")
_SD3_DEFAULTS: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)

# -------------------------------------------------------------------------------------------------------
# DiT <-> PixArtTransformer2DModel
# -------------------------------------------------------------------------------------------------------


def dit_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `PixArtTransformer2DModel` config -> our `DiT` constructor kwargs."""
    cfg = {**_PIXART_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key in _PIXART_FIXED:
        if cfg[key] != _PIXART_DEFAULTS[key]:
            raise ValueError(f"unsupported {key}={cfg[key]!r}; only {_PIXART_DEFAULTS[key]!r} is supported")
    additional = cfg["use_additional_conditions"]
    if additional or (additional is None and cfg["sample_size"] == 128):  # diffusers' rule for None
        raise ValueError("use_additional_conditions (PixArt-alpha 1024 px: resolution and aspect-ratio embeddings) "
                         "is not supported; set it to false explicitly if the checkpoint lacks them")
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_channels"] is None or cfg["cross_attention_dim"] != hidden:
        raise ValueError(f"need caption_channels (the text width) and cross_attention_dim == heads * head_dim "
                         f"({hidden}), got {cfg['caption_channels']} and {cfg['cross_attention_dim']}")
    scale = cfg["interpolation_scale"]
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"] or cfg["in_channels"], hidden_size=hidden,
        depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"], patch_size=cfg["patch_size"],
        context_dim=cfg["caption_channels"], mlp_ratio=4.0, sample_size=cfg["sample_size"],
        interpolation_scale=float(scale if scale is not None else max(cfg["sample_size"] // 64, 1)),
    )


def convert_diffusers_dit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `PixArtTransformer2DModel` state dict -> ours, ready for `load_state_dict(strict=True)`."""
    return _gather(state_dict, _dit_pairs(_depth(state_dict, "transformer_blocks")))


def dit_from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], **overrides: Any) -> DiT:
    """Our `DiT` with diffusers' weights; `overrides` go to the constructor (e.g. gradient_checkpointing=True)."""
    model = DiT(**{**dit_kwargs_from_diffusers_config(config), **overrides})
    model.load_state_dict(convert_diffusers_dit(state_dict), strict=True)
    return model


def dit_to_diffusers(model: DiT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state dict) of the same network as a diffusers `PixArtTransformer2DModel`."""
    c = model.config
    if c["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' PixArt has a 4x MLP, this DiT {c['mlp_ratio']}x")
    config = dict(
        num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"], out_channels=c["out_channels"], num_layers=c["depth"],
        cross_attention_dim=c["hidden_size"], caption_channels=c["context_dim"], sample_size=c["sample_size"],
        patch_size=c["patch_size"], interpolation_scale=c["interpolation_scale"], use_additional_conditions=False,
        **{k: _PIXART_DEFAULTS[k] for k in _PIXART_FIXED},
    )
    return config, _scatter(model.state_dict(), _dit_pairs(c["depth"]))


def _dit_pairs(depth: int) -> Pairs:
    pairs = [
        *_linear("patch_embed.proj", "pos_embed.proj"),
        *_linear("t_embed.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
        *_linear("t_embed.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
        *_linear("t_mod", "adaln_single.linear"),
        *_linear("context_proj.fc1", "caption_projection.linear_1"),
        *_linear("context_proj.fc2", "caption_projection.linear_2"),
        ("scale_shift_table", ("scale_shift_table",)),
        *_linear("proj_out", "proj_out"),
    ]
    for i in range(depth):
        o, t = f"transformer_blocks.{i}.", f"transformer_blocks.{i}."
        pairs += [
            (o + "scale_shift_table", (t + "scale_shift_table",)),
            *_linear(o + "attn.qkv", *(t + f"attn1.to_{c}" for c in "qkv")),
            *_linear(o + "attn.out", t + "attn1.to_out.0"),
            *_linear(o + "cross_attn.q", t + "attn2.to_q"),
            *_linear(o + "cross_attn.kv", t + "attn2.to_k", t + "attn2.to_v"),
            *_linear(o + "cross_attn.out", t + "attn2.to_out.0"),
            *_linear(o + "mlp.fc1", t + "ff.net.0.proj"),
            *_linear(o + "mlp.fc2", t + "ff.net.2"),
        ]
    return pairs


# -------------------------------------------------------------------------------------------------------
# MMDiT <-> SD3Transformer2DModel
# -------------------------------------------------------------------------------------------------------


def mmdit_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `SD3Transformer2DModel` config -> our `MMDiT` constructor kwargs."""
    cfg = {**_SD3_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["dual_attention_layers"]:
        raise ValueError(f"SD3.5's dual-attention layers are not supported, got dual_attention_layers="
                         f"{list(cfg['dual_attention_layers'])}")
    if cfg["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"qk_norm must be None or 'rms_norm', got {cfg['qk_norm']!r}")
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != hidden:
        raise ValueError(f"caption_projection_dim must equal heads * head_dim ({hidden}), "
                         f"got {cfg['caption_projection_dim']}")
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"] or cfg["in_channels"], hidden_size=hidden,
        depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"], patch_size=cfg["patch_size"],
        context_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"], mlp_ratio=4.0,
        qk_norm=cfg["qk_norm"], sample_size=cfg["sample_size"], pos_embed_max_size=cfg["pos_embed_max_size"],
    )


def convert_diffusers_mmdit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `SD3Transformer2DModel` state dict -> ours, without SD3's stored sin-cos table (ours is computed;
    `mmdit_from_diffusers` compares them)."""
    sd = {k: v for k, v in state_dict.items() if k != "pos_embed.pos_embed"}
    return _gather(sd, _mmdit_pairs(_depth(sd, "transformer_blocks"), "transformer_blocks.0.attn.norm_q.weight" in sd))


def mmdit_from_diffusers(config: Mapping[str, Any], state_dict: Mapping[str, Tensor], **overrides: Any) -> MMDiT:
    """Our `MMDiT` with diffusers' weights, after checking the stored positional table equals our computed one."""
    model = MMDiT(**{**mmdit_kwargs_from_diffusers_config(config), **overrides})
    stored = state_dict.get("pos_embed.pos_embed")
    if stored is not None and model.pos_embed.max_size is not None:
        M = model.pos_embed.max_size
        ours = model.pos_embed.table(M, M).to(stored.dtype).float()
        tol = 1e-5 if stored.dtype in (torch.float32, torch.float64) else 2 * torch.finfo(stored.dtype).eps
        if stored.shape != ours.shape or not torch.allclose(stored.float(), ours, rtol=0, atol=tol):
            diff = (stored.float() - ours).abs().max().item() if stored.shape == ours.shape else "shape"
            raise ValueError(f"the checkpoint's positional table (pos_embed.pos_embed, {tuple(stored.shape)}) is not "
                             f"the sin-cos grid sample_size/pos_embed_max_size give (max |diff| {diff})")
    model.load_state_dict(convert_diffusers_mmdit(state_dict), strict=True)
    return model


def mmdit_to_diffusers(model: MMDiT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state dict) of the same network as a diffusers `SD3Transformer2DModel` (with its positional table)."""
    c = model.config
    if c["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' SD3 has a 4x MLP, this MMDiT {c['mlp_ratio']}x")
    config = dict(
        sample_size=c["sample_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
        num_layers=c["depth"], attention_head_dim=c["hidden_size"] // c["num_heads"],
        num_attention_heads=c["num_heads"], joint_attention_dim=c["context_dim"],
        caption_projection_dim=c["hidden_size"], pooled_projection_dim=c["pooled_dim"],
        out_channels=c["out_channels"], pos_embed_max_size=c["pos_embed_max_size"], dual_attention_layers=(),
        qk_norm=c["qk_norm"],
    )
    state_dict = _scatter(model.state_dict(), _mmdit_pairs(c["depth"], c["qk_norm"] is not None))
    M = c["pos_embed_max_size"]
    if M is not None:  # a persistent buffer in diffusers
        state_dict["pos_embed.pos_embed"] = model.pos_embed.table(M, M, model.proj_out.weight.device)
    return config, state_dict


def _mmdit_pairs(depth: int, qk_norm: bool) -> Pairs:
    pairs = [
        *_linear("patch_embed.proj", "pos_embed.proj"),
        *_linear("t_embed.linear_1", "time_text_embed.timestep_embedder.linear_1"),
        *_linear("t_embed.linear_2", "time_text_embed.timestep_embedder.linear_2"),
        *_linear("pooled_embed.fc1", "time_text_embed.text_embedder.linear_1"),
        *_linear("pooled_embed.fc2", "time_text_embed.text_embedder.linear_2"),
        *_linear("context_embed", "context_embedder"),
        *_linear("out_mod", "norm_out.linear"),
        *_linear("proj_out", "proj_out"),
    ]
    for i in range(depth):
        o, t = f"transformer_blocks.{i}.", f"transformer_blocks.{i}."
        pairs += [
            *_linear(o + "x.mod", t + "norm1.linear"),
            *_linear(o + "c.mod", t + "norm1_context.linear"),
            *_linear(o + "x.qkv", *(t + f"attn.to_{c}" for c in "qkv")),
            *_linear(o + "c.qkv", *(t + f"attn.add_{c}_proj" for c in "qkv")),
        ]
        if qk_norm:
            pairs += [(o + f"{s}.norm_{c}.weight", (t + f"attn.norm_{a}{c}.weight",))
                      for s, a in (("x", ""), ("c", "added_")) for c in "qk"]
        streams = [("x", "attn.to_out.0", "ff")] + ([("c", "attn.to_add_out", "ff_context")] if i < depth - 1 else [])
        for s, out, ff in streams:
            pairs += [*_linear(o + f"{s}.out", t + out), *_linear(o + f"{s}.mlp.fc1", t + f"{ff}.net.0.proj"),
                      *_linear(o + f"{s}.mlp.fc2", t + f"{ff}.net.2")]
    return pairs


# -------------------------------------------------------------------------------------------------------
# Loading a diffusers folder
# -------------------------------------------------------------------------------------------------------


def load_diffusers_transformer(directory: str | Path, **overrides: Any) -> nn.Module:
    """Our `DiT` or `MMDiT` from a local diffusers folder, chosen by its config's `_class_name`."""
    config, state_dict = read_diffusers_folder(directory)
    builders = {"PixArtTransformer2DModel": dit_from_diffusers, "SD3Transformer2DModel": mmdit_from_diffusers}
    name = config.get("_class_name")
    if name not in builders:
        raise ValueError(f"{directory}/config.json: _class_name {name!r} is none of {sorted(builders)}")
    return builders[name](config, state_dict, **overrides)


# -------------------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------------------


def _linear(ours: str, *theirs: str) -> Pairs:
    return [(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs)) for p in ("weight", "bias")]


def _depth(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _gather(state_dict: Mapping[str, Tensor], pairs: Pairs) -> dict[str, Tensor]:
    """Ours from theirs: each of our keys from its diffusers keys (concatenated when several)."""
    theirs, ours = dict(state_dict), {}
    missing = [k for _, keys in pairs for k in keys if k not in theirs]
    if missing:
        raise ValueError(f"{len(missing)} expected diffusers keys are missing, e.g. {missing[:5]}")
    for key, keys in pairs:
        ours[key] = torch.cat([theirs.pop(k) for k in keys]) if len(keys) > 1 else theirs.pop(keys[0])
    if theirs:
        raise ValueError(f"{len(theirs)} diffusers keys have no counterpart (an unsupported variant?), "
                         f"e.g. {sorted(theirs)[:5]}")
    return ours


def _scatter(state_dict: Mapping[str, Tensor], pairs: Pairs) -> dict[str, Tensor]:
    """Theirs from ours: fused tensors split into equal parts along dim 0 (cloned, so `save_file` accepts them)."""
    ours, theirs = dict(state_dict), {}
    for key, keys in pairs:
        parts = ours.pop(key).chunk(len(keys)) if len(keys) > 1 else (ours.pop(key),)
        theirs.update({k: part.clone() if len(keys) > 1 else part for k, part in zip(keys, parts, strict=True)})
    if ours:
        raise ValueError(f"{len(ours)} of our keys have no diffusers counterpart, e.g. {sorted(ours)[:5]}")
    return theirs
