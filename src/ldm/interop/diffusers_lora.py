"""A UNet LoRA in the format diffusers loads (`pipe.load_lora_weights(folder)`, `unet.load_lora_adapter(...)`): peft's
`lora_A` / `lora_B` tensors under diffusers' `UNet2DConditionModel` module names, prefixed `unet.`, in
`pytorch_lora_weights.safetensors`.

Our fused projections split exactly: the rank-r update B A of `attn1.qkv` is, for `to_q`, `to_k` and `to_v`, the same
A with B's first, second and third block of rows (likewise `attn2.kv` -> `to_k`, `to_v`). diffusers reads peft-format
files with lora_alpha = rank, so the scale alpha / rank is folded into B.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.inference.lora import lora_backbone
from ldm.models.lora import LoRA, adapter_state_dict
from ldm.models.unet.convert import _rename
from ldm.models.unet.unet import UNet

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name `load_lora_weights(folder)` looks for
# Our module name -> diffusers' (leading dot to anchor on): the inverse of `convert._RULES` for the LoRA targets.
_INVERSE: list[tuple[str, str]] = [
    (r"^\.(down|up)\.(\d+)\.attn\.", r".\1_blocks.\2.attentions."),
    (r"^\.mid\.attn\.", ".mid_block.attentions.0."),
    (r"\.blocks\.", ".transformer_blocks."),
    (r"\.(attn[12])\.out$", r".\1.to_out.0"),
    (r"\.attn2\.q$", ".attn2.to_q"),
    (r"\.ff\.proj$", ".ff.net.0.proj"),
    (r"\.ff\.out$", ".ff.net.2"),
]
# Fused projections: our suffix -> diffusers' suffixes, one per block of output rows.
_FUSED = {"attn1.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn2.kv": ("attn2.to_k", "attn2.to_v")}
# The projections of a diffusers `BasicTransformerBlock` inside a UNet2DConditionModel.
_DIFFUSERS_TARGET = re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
                               r"(attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)")


def diffusers_names(name: str) -> list[str]:
    """diffusers' module name(s) for one of our UNet's LoRA target modules (three or two for a fused one), checked
    against the diffusers -> ours renaming that loads diffusers UNets (`ldm.models.unet.convert`)."""
    fused = next((parts for ours, parts in _FUSED.items() if name.endswith("." + ours)), None)
    stem = name.rsplit(".", 2 if fused else 1)[0] if fused else None
    unfused = [f"{stem}.{part}" for part in fused] if fused else [name]
    out = []
    for ours in unfused:
        theirs = "." + ours
        for pattern, replacement in _INVERSE:
            theirs = re.sub(pattern, replacement, theirs)
        theirs = theirs[1:]
        if not _DIFFUSERS_TARGET.fullmatch(theirs) or _rename(theirs + ".weight") != ours + ".weight":
            raise ValueError(f"{name}: no diffusers UNet2DConditionModel module name maps to it (tried {theirs}).")
        out.append(theirs)
    return out


def diffusers_lora_state_dict(backbone: nn.Module, lora: LoRA) -> dict[str, Tensor]:
    """The adapters of a UNet carrying them (`LoRA.apply`) as diffusers' `unet.<module>.lora_A/B.weight` tensors."""
    if not isinstance(backbone, UNet):
        raise ValueError(f"The diffusers LoRA format is written for UNet backbones only; a {type(backbone).__name__} "
                         "has no diffusers module names here. Export the ldm adapter (format=ldm) instead.")
    state = adapter_state_dict(backbone)
    out: dict[str, Tensor] = {}
    for key in sorted(k for k in state if k.endswith(".lora_A.weight")):
        module = key.removesuffix(".lora_A.weight")
        a, b = state[key], state[f"{module}.lora_B.weight"] * lora.scale  # (r, in), (out, r)
        names = diffusers_names(module)
        for theirs, b_rows in zip(names, b.chunk(len(names), dim=0)):
            out[f"unet.{theirs}.lora_A.weight"] = a.clone()
            out[f"unet.{theirs}.lora_B.weight"] = b_rows.contiguous()
    return out


def export_diffusers_lora(ckpt: str | Path, out_dir: str | Path, *, ema: bool | None = None) -> Path:
    """A LoRA run's adapter (EMA by default) as `<out_dir>/pytorch_lora_weights.safetensors`; returns the folder."""
    backbone, lora, which = lora_backbone(ckpt, ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in diffusers_lora_state_dict(backbone, lora).items()}
    save_file(tensors, str(out / LORA_WEIGHTS), metadata={"format": "pt", "ldm_weights": which})
    return out
