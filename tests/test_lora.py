"""LoRA on every backbone (ldm.models.lora): the targets each declares, zero-init == base, merged == unmerged,
adapter files round-trip, and adapters for another architecture or rank are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.conf import CONF_DIR
from ldm.models import transformer_blocks
from ldm.models.backbone import Conditioning
from ldm.models.lora import (
    LoRA,
    adapter_state_dict,
    attach_adapter,
    base_state_dict,
    has_lora,
    load_adapter_state,
    merge_lora,
    save_adapter,
    set_scale,
)
from ldm.models.unet import blocks as unet_blocks

BACKBONES = ("unet_tiny", "dit_tiny", "mmdit_tiny")


def backbone(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = hydra.utils.instantiate(OmegaConf.load(Path(CONF_DIR) / "model" / "backbone" / f"{name}.yaml"))
    for p in net.parameters():  # no zero-initialised output layers: every path must show in the output
        nn.init.normal_(p, std=0.02)
    return net.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8]),
            Conditioning(torch.randn(2, 77, 64, generator=g), torch.randn(2, 64, generator=g)))


def attention_and_mlp_linears(net: nn.Module) -> tuple[set[str], set[str]]:
    """The oracle, found by class: the nn.Linears of every attention module (MMDiT: of its streams, which hold the
    joint attention's projections) and of every block's feed-forward (not the caption or pooled-text MLPs)."""
    attention_types = (unet_blocks.SelfAttention, unet_blocks.CrossAttention, transformer_blocks.SelfAttention,
                       transformer_blocks.CrossAttention)
    attention, mlp = set(), set()
    for name, module in net.named_modules():
        linears = {f"{name}.{c}" for c, m in module.named_children() if isinstance(m, nn.Linear)}
        if isinstance(module, attention_types):
            attention |= linears
        elif type(module).__name__ == "Stream":
            attention |= {f"{name}.{c}" for c in ("qkv", "out") if f"{name}.{c}" in linears}
        elif isinstance(module, unet_blocks.GEGLUFeedForward) or (isinstance(module, transformer_blocks.Mlp)
                                                                   and name.endswith(".mlp")):
            mlp |= linears
    return attention, mlp


@pytest.mark.parametrize("name", BACKBONES)
def test_each_backbone_declares_its_attention_and_mlp_projections(name: str) -> None:
    net = backbone(name)
    attention, mlp = attention_and_mlp_linears(net)
    assert attention and mlp
    assert set(LoRA(targets="attention").target_modules(net)) == attention
    assert set(LoRA(targets="attention+mlp").target_modules(net)) == attention | mlp


@pytest.mark.parametrize("name", BACKBONES)
def test_zero_init_is_the_base_model_and_merged_equals_unmerged(name: str, one_thread) -> None:
    x, c_noise, cond = inputs()
    net = backbone(name)
    with torch.no_grad():
        base = net(x, c_noise, cond)
        LoRA(rank=4, targets="attention+mlp").apply(net)
        assert torch.equal(net(x, c_noise, cond), base)  # B = 0: bit-identical
        for n, p in net.named_parameters():
            if n.endswith("lora_B.default.weight"):
                nn.init.normal_(p, std=0.5)
        adapted = net(x, c_noise, cond)
        merged = merge_lora(net)(x, c_noise, cond)
    assert not has_lora(net) and (adapted - base).abs().max() > 1e-3
    # fp32, another order of operations: agreement to ~1e-6 of the output's scale
    torch.testing.assert_close(merged, adapted, atol=1e-6 * adapted.abs().max().item(), rtol=1e-5)


def test_merge_is_w_plus_scaled_b_a_on_a_fused_projection() -> None:
    net = backbone("unet_tiny")
    lora = LoRA(rank=2, alpha=6, init="random")
    lora.apply(net)
    name = "mid.attn.blocks.0.attn1.qkv"
    layer = net.get_submodule(name)
    w0, a, b = (layer.base_layer.weight.clone(), layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    expected = w0 + lora.scale * b @ a  # (3C, C): one A shared by the q, k and v rows
    merge_lora(net)
    torch.testing.assert_close(net.get_submodule(name).weight, expected)
    assert list(net.state_dict()) == list(backbone("unet_tiny").state_dict())  # the plain names again


def test_only_adapters_train_and_scale_zero_gives_the_base() -> None:
    x, c_noise, cond = inputs()
    net = backbone("dit_tiny")
    with torch.no_grad():
        base = net(x, c_noise, cond)
    LoRA(rank=4, init="random").apply(net)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    set_scale(net, 0.0)
    with torch.no_grad():
        assert torch.equal(net(x, c_noise, cond), base)


@pytest.mark.parametrize("name", BACKBONES)
def test_adapter_files_round_trip(name: str, tmp_path: Path) -> None:
    x, c_noise, cond = inputs()
    trained = LoRA(rank=4, alpha=8, targets="attention", init="random").apply(backbone(name))
    out = save_adapter(trained, LoRA(rank=4, alpha=8, targets="attention", init="random"), tmp_path / "lora")
    card = json.loads((out / "lora.json").read_text())
    assert card["lora"]["rank"] == 4 and card["backbone"]["_target_"].endswith(type(trained).__name__)
    fresh = attach_adapter(backbone(name), out)
    trained.requires_grad_(False)  # as attach_adapter leaves it: autograd-free kernels round differently (~1e-7)
    with torch.no_grad():
        assert torch.equal(fresh(x, c_noise, cond), trained(x, c_noise, cond))
        merged = attach_adapter(backbone(name), out, merge=True)
        assert not has_lora(merged)
        torch.testing.assert_close(merged(x, c_noise, cond), trained(x, c_noise, cond), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, adapter_state_dict(fresh)[k]) for k, v in adapter_state_dict(trained).items())


def test_an_adapter_of_another_architecture_or_rank_is_refused_by_name(tmp_path: Path, caplog) -> None:
    out = save_adapter(LoRA(rank=4).apply(backbone("unet_tiny")), LoRA(rank=4), tmp_path / "lora")
    with pytest.raises(ValueError, match=r"trained for another backbone: .*_target_='ldm.models.unet.unet.UNet' "
                                         r"there, 'ldm.models.dit.DiT' here"):
        attach_adapter(backbone("dit_tiny"), out)
    wider = hydra.utils.instantiate(OmegaConf.load(Path(CONF_DIR) / "model/backbone/unet_tiny.yaml"), model_channels=64)
    with pytest.raises(ValueError, match="model_channels=32 there, 64 here"):
        attach_adapter(wider, out)
    checkpointed = backbone("unet_tiny")
    checkpointed.gradient_checkpointing = True  # a training switch, not another architecture
    attach_adapter(checkpointed, out)
    rank8 = LoRA(rank=8).apply(backbone("unet_tiny"))
    with pytest.raises(ValueError, match=r"does not fit this UNet's adapters: shapes differ for "
                                         r"\['down.0.attn.0.blocks.0.attn1.qkv.lora_A.weight \(4, 32\) vs \(8, 32\)"):
        load_adapter_state(rank8, adapter_state_dict(LoRA(rank=4).apply(backbone("unet_tiny"))))
    with_mlp = LoRA(rank=4, targets="attention+mlp").apply(backbone("unet_tiny"))
    with pytest.raises(ValueError, match=r"missing \['down.0.attn.0.blocks.0.ff.out.lora_A.weight'"):
        load_adapter_state(with_mlp, adapter_state_dict(LoRA(rank=4).apply(backbone("unet_tiny"))))
    other_base = backbone("unet_tiny", seed=5)
    with caplog.at_level("WARNING"):
        attach_adapter(other_base, out)  # same architecture, other weights: a fine-tune, allowed
    assert "another fine-tune" in caplog.text


def test_bad_settings_and_undeclared_backbones_are_refused() -> None:
    with pytest.raises(ValueError, match="targets must be 'attention' or 'attention\\+mlp', got 'mlp'"):
        LoRA(targets="mlp")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRA(rank=0)
    with pytest.raises(TypeError, match="Sequential declares no LoRA targets"):
        LoRA().apply(nn.Sequential(nn.Linear(2, 2)))
    net = LoRA().apply(backbone("unet_tiny"))
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        LoRA().apply(net)
    assert set(base_state_dict(net)) == set(backbone("unet_tiny").state_dict())


def test_adapters_get_the_same_gradients_under_gradient_checkpointing(one_thread) -> None:
    """The frozen base gives checkpointed blocks inputs that need no gradient: the adapters' must still arrive."""
    x, c_noise, cond = inputs()
    grads = []
    for checkpointing in (False, True):
        net = backbone("unet_tiny")
        net.gradient_checkpointing = checkpointing
        LoRA(rank=4, init="random").apply(net).train()
        net(x, c_noise, cond).square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().max() > 0 for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g)


def test_the_base_hash_reads_any_dtype() -> None:
    from ldm.models.lora import weights_sha256

    w = {"a": torch.ones(2, 3)}
    assert weights_sha256({"a": w["a"].bfloat16()}) != weights_sha256(w) == weights_sha256({"a": torch.ones(2, 3)})
    assert weights_sha256({"s": torch.tensor(1.0)}) != weights_sha256({"s": torch.tensor(2.0)})
