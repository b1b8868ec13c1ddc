"""The diffusers LoRA format (ldm.interop.diffusers_lora): a LoRA trained on our UNet, written under diffusers' module
names, read by diffusers' own `StableDiffusionPipeline.lora_state_dict` + `load_lora_into_unet` (what
`pipe.load_lora_weights(folder)` runs) into the same weights as a diffusers UNet2DConditionModel, gives our outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from ldm.interop.diffusers_lora import LORA_WEIGHTS, diffusers_lora_state_dict, diffusers_names
from ldm.models.lora import LoRA
from ldm.models.unet.convert import convert_diffusers_unet, unet_kwargs_from_diffusers_config
from ldm.models.unet.unet import UNet

# Attention at both levels and in the mid block, two transformer blocks each: every name pattern occurs.
CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, use_linear_projection=True,
              transformer_layers_per_block=2, norm_num_groups=8, cross_attention_dim=32, sample_size=16,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def pair() -> tuple[UNet2DConditionModel, UNet]:
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**CONFIG).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    ours = UNet(**unet_kwargs_from_diffusers_config(theirs.config)).eval()
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True)
    return theirs, ours


@pytest.mark.parametrize("targets", ["attention", "attention+mlp"])
def test_diffusers_loads_our_lora_with_equal_outputs(targets: str, tmp_path: Path, one_thread) -> None:
    theirs, ours = pair()
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 700]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        base = theirs(x, t, context).sample
    lora = LoRA(rank=4, alpha=2.0, targets=targets, init="random")  # scale 0.5: folded into B for diffusers
    lora.apply(ours)
    save_file(diffusers_lora_state_dict(ours, lora), str(tmp_path / LORA_WEIGHTS))

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path))  # what load_lora_weights(folder) reads
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs)
    ours_adapted = [n for n, m in ours.named_modules() if isinstance(m, LoraLayer)]
    expected_layers = sum(3 if n.endswith("attn1.qkv") else 2 if n.endswith("attn2.kv") else 1 for n in ours_adapted)
    assert sum(isinstance(m, LoraLayer) for m in theirs.modules()) == expected_layers  # every key found its module
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        out = ours(x, t, context)
    assert (expected - base).abs().max() > 0.05  # the adapter took effect in diffusers
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_names_follow_the_loading_converter_and_other_backbones_are_refused() -> None:
    assert diffusers_names("down.1.attn.0.blocks.1.attn1.qkv") == [
        f"down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_{c}" for c in "qkv"]
    assert diffusers_names("mid.attn.blocks.0.attn2.kv") == [
        f"mid_block.attentions.0.transformer_blocks.0.attn2.to_{c}" for c in "kv"]
    assert diffusers_names("up.0.attn.2.blocks.0.ff.proj") == ["up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj"]
    with pytest.raises(ValueError, match="no diffusers UNet2DConditionModel module name maps to it"):
        diffusers_names("mid.res_1.emb_proj")
    from ldm.models.dit import DiT

    dit = DiT(hidden_size=32, depth=1, num_heads=2, context_dim=32, sample_size=8)
    lora = LoRA(rank=2)
    lora.apply(dit)
    with pytest.raises(ValueError, match="diffusers LoRA format is written for UNet backbones only; a DiT"):
        diffusers_lora_state_dict(dit, lora)
