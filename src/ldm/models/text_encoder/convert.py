"""Our OpenCLIP text tower <-> transformers' `CLIPTextModel` (+ `CLIPTokenizer` files), both ways, exactly.

Stable Diffusion 2.x ships its OpenCLIP ViT-H/14 text tower as a transformers `CLIPTextModel` with one block fewer
(23 of 24): the pipeline's prompt states, `last_hidden_state = final_layer_norm(block 23's output)`, are then our
`layer="penultimate"` states (`ln_final` of the input of the last block). The same conversion is done here:

    config, state = openclip_to_clip_text(encoder)          # CLIPTextConfig kwargs + state dict
    model = CLIPTextModel(CLIPTextConfig(**config)); model.load_state_dict(state, strict=True)
    write_clip_tokenizer(folder / "tokenizer")              # vocab.json, merges.txt, ... for CLIPTokenizer

and back, for an SD 2.x `text_encoder/` folder (`config.json` + `model.safetensors`):

    openclip_config, state = clip_text_to_openclip(config, state)
    write_openclip_config(folder, "sd2-text", openclip_config)
    encoder = OpenCLIPTextEncoder("sd2-text", pretrained=None, layer="last", model_config_dir=str(folder))
    encoder.text.load_state_dict(state, strict=True)

`layer="last"` there because the exported tower already ends where our "penultimate" states are taken. The pooled
embedding needs the last block and the projection: `CLIPTextModel` has neither (SD pipelines never use them), so an
exported penultimate tower does not carry them and an imported one gets a zero projection (see
`clip_text_to_openclip`). Only plain CLIP text towers convert; others are refused by name.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder

# The ids open_clip's tokenizer gives its special tokens: the last two of the 49408-token vocabulary.
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
# the vision tower open_clip's config registry requires of every model json (`embed_dim`, `vision_cfg`,
# `text_cfg`); OpenCLIPTextEncoder builds the text tower alone, so this one is never built
_UNUSED_VISION_CFG = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}


# ----------------------------------------------------------------------------------------------------
# Ours -> transformers
# ----------------------------------------------------------------------------------------------------


def openclip_to_clip_text(encoder: OpenCLIPTextEncoder) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Our text encoder -> (`CLIPTextConfig` kwargs, `CLIPTextModel` state dict) whose `last_hidden_state` is exactly
    what `encoder.encode(prompts).tokens` returns: with `layer="penultimate"` the last block is left out (as SD 2.x
    did), with `"last"` all blocks are kept. The projection (pooled embedding) is not part of `CLIPTextModel`."""
    text = encoder.text
    _check_plain_tower(text)
    blocks = len(text.transformer.resblocks) - (encoder.layer == "penultimate")
    width = text.width
    block0 = text.transformer.resblocks[0]
    config = dict(
        vocab_size=int(text.vocab_size), hidden_size=width,
        intermediate_size=block0.mlp.c_fc.out_features, num_hidden_layers=blocks,
        num_attention_heads=text.heads, max_position_embeddings=int(text.context_length),
        hidden_act="quick_gelu" if _is_quick_gelu(block0) else "gelu", layer_norm_eps=float(text.ln_final.eps),
        projection_dim=int(encoder.pooled_dim), bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID,
    )
    state = {
        "embeddings.token_embedding.weight": text.token_embedding.weight,
        "embeddings.position_embedding.weight": text.positional_embedding,
        "final_layer_norm.weight": text.ln_final.weight,
        "final_layer_norm.bias": text.ln_final.bias,
    }
    for i, block in enumerate(text.transformer.resblocks[:blocks]):
        p = f"encoder.layers.{i}."
        for name, tensor in zip("qkv", block.attn.in_proj_weight.chunk(3), strict=True):
            state[f"{p}self_attn.{name}_proj.weight"] = tensor
        for name, tensor in zip("qkv", block.attn.in_proj_bias.chunk(3), strict=True):
            state[f"{p}self_attn.{name}_proj.bias"] = tensor
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            state[f"{p}{theirs}.weight"], state[f"{p}{theirs}.bias"] = module.weight, module.bias
    return config, {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_clip_tokenizer(directory: str | Path, context_length: int = 77) -> Path:
    """`CLIPTokenizer` files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, ...) built
    offline from open_clip's own BPE file, so that `CLIPTokenizer.from_pretrained(directory)` gives open_clip's ids.

    The vocabulary is the one open_clip builds in `SimpleTokenizer`: 256 byte symbols, the same with `</w>`, then one
    token per merge, then the two special tokens, written under their OpenAI/transformers names. Padding is id 0
    ("!"), what open_clip pads with and what SD 2.x's tokenizer uses.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]  # the slice SimpleTokenizer takes
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # split_special_tokens: "!" (the pad token, id 0) is also a plain vocabulary symbol; without it transformers
    # would cut every "!" out of the text as the special token (id 0) instead of BPE-merging it ("!</w>", 256).
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                              pad_token="!", model_max_length=context_length, split_special_tokens=True)
    tokenizer.save_pretrained(str(directory))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    if not (directory / "special_tokens_map.json").is_file():  # transformers 5 keeps these in tokenizer_config
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


# ----------------------------------------------------------------------------------------------------
# transformers -> ours
# ----------------------------------------------------------------------------------------------------


def clip_text_to_openclip(config: Mapping[str, Any], state: Mapping[str, Tensor]
                          ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers `CLIPTextModel` (its `config.json` as a dict, and its state dict, keys with or without the
    `text_model.` prefix) -> (an open_clip model config, the state dict of `OpenCLIPTextEncoder.text`).

    Build the encoder from the config with `write_openclip_config(folder, name, config)` and
    `OpenCLIPTextEncoder(name, pretrained=None, layer="last", model_config_dir=folder)`, then
    `encoder.text.load_state_dict(state, strict=True)`: its token states are the model's `last_hidden_state` (for
    SD 2.x's 23-block tower, SD 2.x's conditioning). `text_projection` comes from a `CLIPTextModelWithProjection`'s
    `text_projection.weight` when the state has one, else it is zero (a plain `CLIPTextModel` has no projection: the
    pooled embedding is then 0, which SD 1.x/2.x UNets never read).
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"hidden_act={act!r} has no open_clip counterpart; expected 'gelu' or 'quick_gelu'")
    width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    layers, inner = int(config["num_hidden_layers"]), int(config.get("intermediate_size", 4 * width))
    if inner % width:
        raise ValueError(f"intermediate_size={inner} is not a multiple of hidden_size={width} (open_clip's mlp_ratio)")
    vocab_size = int(config.get("vocab_size", 49408))
    if vocab_size != 49408:
        raise ValueError(f"vocab_size={vocab_size}: only CLIP's 49408-token BPE vocabulary (open_clip's) is supported")
    projection = state.get("text_projection.weight")
    embed_dim = int(projection.shape[0]) if projection is not None else int(config.get("projection_dim", width))
    openclip_config = dict(
        embed_dim=embed_dim, quick_gelu=act == "quick_gelu", vision_cfg=dict(_UNUSED_VISION_CFG),
        text_cfg=dict(context_length=int(config.get("max_position_embeddings", 77)), vocab_size=vocab_size,
                      width=width, heads=heads, layers=layers, mlp_ratio=inner / width),
    )
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": projection.T if projection is not None else torch.zeros(width, embed_dim),
    }
    for i in range(layers):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[f"{q}attn.in_proj_weight"] = torch.cat([state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{q}attn.in_proj_bias"] = torch.cat([state[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{q}{ours}.weight"], out[f"{q}{ours}.bias"] = state[f"{p}{theirs}.weight"], state[f"{p}{theirs}.bias"]
    return openclip_config, {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_openclip_config(directory: str | Path, name: str, config: Mapping[str, Any]) -> Path:
    """Write `config` as `<directory>/<name>.json`, the form `OpenCLIPTextEncoder(name, model_config_dir=directory)`
    reads (open_clip's `add_model_config`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(dict(config), indent=2))
    return path


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _check_plain_tower(text: nn.Module) -> None:
    """Refuse open_clip text towers that `CLIPTextModel` cannot express, naming the option."""
    unsupported = {
        "no causal mask (no_causal_mask)": text.attn_mask is None,
        f"pool_type={text.pool_type!r} (CLIP pools the EOT token, 'argmax')": text.pool_type != "argmax",
        "a class token (embed_cls)": getattr(text, "cls_emb", None) is not None,
        "a projection with bias or an MLP (proj_type/proj_bias)": isinstance(text.text_projection, nn.Module),
    }
    block = text.transformer.resblocks[0]
    unsupported["layer scale (ls_init_value)"] = not isinstance(getattr(block, "ls_1", nn.Identity()), nn.Identity)
    unsupported["a block other than the standard residual attention block"] = not hasattr(block.attn, "in_proj_weight")
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"this OpenCLIP text tower has {', '.join(bad)}, which transformers' CLIPTextModel cannot "
                         "represent")


def _is_quick_gelu(block: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in block.mlp.modules())
