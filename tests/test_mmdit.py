"""The MMDiT: parity with diffusers' SD3Transformer2DModel on converted random weights, conversion both ways,
positions at any size, gradient checkpointing, bad input, the backbone contract and the presets."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import hydra
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from omegaconf import OmegaConf

from ldm.models.backbone import Backbone, Conditioning, check_backbone
from ldm.models.convert_transformers import (
    convert_diffusers_mmdit,
    load_diffusers_transformer,
    mmdit_from_diffusers,
    mmdit_kwargs_from_diffusers_config,
    mmdit_to_diffusers,
)
from ldm.models.mmdit import MMDiT

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10)
TINY = dict(in_channels=4, out_channels=4, hidden_size=16, depth=3, num_heads=2, context_dim=12, pooled_dim=10,
            qk_norm="rms_norm", sample_size=8, pos_embed_max_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, the zero-initialised ones (modulations, outputs) and the QK-norm gains included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    return model


def sd3(**overrides) -> SD3Transformer2DModel:
    return randomize(SD3Transformer2DModel(**{**SD3, **overrides})).eval()


def inputs(height: int = 8, width: int = 8, batch: int = 2, tokens: int = 5, width_c: int = 12, width_p: int = 10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, height, width, generator=g)
    c_noise = torch.tensor([3.7, 812.25])[:batch]
    context = torch.randn(batch, tokens, width_c, generator=g)
    pooled = torch.randn(batch, width_p, generator=g)
    return x, c_noise, context, pooled


# -------------------------------------------------------------------------------------------------------
# Parity and conversion
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"], ids=["no_qk_norm", "qk_rms_norm"])
@pytest.mark.parametrize("max_size", [16, None], ids=["cropped_grid", "grid_per_size"])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["8x8", "6x10"])
def test_diffusers_weights_give_same_outputs(qk_norm: str | None, max_size: int | None,
                                             size: tuple[int, int]) -> None:
    theirs = sd3(qk_norm=qk_norm, pos_embed_max_size=max_size)
    ours = mmdit_from_diffusers(theirs.config, theirs.state_dict()).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x, c_noise, context, pooled = inputs(*size)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=c_noise).sample
        out = ours(x, c_noise, Conditioning(context, pooled))
    assert expected.abs().max() > 0.1  # random weights: a non-trivial function
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_size", [16, None], ids=["cropped_grid", "grid_per_size"])
def test_round_trip_through_diffusers_is_exact(max_size: int | None) -> None:
    ours = randomize(MMDiT(**{**TINY, "pos_embed_max_size": max_size})).eval()
    config, state_dict = mmdit_to_diffusers(ours)
    theirs = SD3Transformer2DModel(**config).eval()
    theirs.load_state_dict(state_dict, strict=True)  # with SD3's stored positional table when it has one
    back = convert_diffusers_mmdit(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert {**mmdit_kwargs_from_diffusers_config(theirs.config), "gradient_checkpointing": False} == ours.config
    x, c_noise, context, pooled = inputs(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, c_noise, Conditioning(context, pooled)),
            theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=c_noise).sample,
            rtol=1e-5, atol=1e-5)


def test_load_a_diffusers_folder(tmp_path: Path) -> None:
    theirs = sd3(qk_norm="rms_norm", pos_embed_max_size=16)
    theirs.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors, positional table included
    ours = load_diffusers_transformer(tmp_path)
    assert isinstance(ours, MMDiT)
    x, c_noise, context, pooled = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            ours.eval()(x, c_noise, Conditioning(context, pooled)),
            theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=c_noise).sample,
            rtol=1e-5, atol=1e-5)


def test_positions_at_any_size_equal_diffusers() -> None:
    for max_size in (16, None):
        theirs = sd3(pos_embed_max_size=max_size)
        ours = mmdit_from_diffusers(theirs.config, theirs.state_dict())
        embed = theirs.pos_embed
        for h, w in [(4, 4), (3, 5), (16, 16), (9, 2)]:
            if max_size:  # SD3: centre crops of the stored grid (the arguments are in latent pixels)
                expected = embed.cropped_pos_embed(2 * h, 2 * w)
            else:
                expected = get_2d_sincos_pos_embed(16, (h, w), base_size=embed.base_size,
                                                   interpolation_scale=embed.interpolation_scale).float()[None]
            assert torch.equal(ours.pos_embed(h, w, torch.device("cpu")), expected)


def test_a_stored_positional_table_that_differs_is_refused() -> None:
    theirs = sd3(pos_embed_max_size=16)
    state_dict = theirs.state_dict()
    state_dict["pos_embed.pos_embed"] = state_dict["pos_embed.pos_embed"] * 1.01
    with pytest.raises(ValueError, match="positional table"):
        mmdit_from_diffusers(theirs.config, state_dict)
    state_dict["pos_embed.pos_embed"] = theirs.state_dict()["pos_embed.pos_embed"].to(torch.bfloat16)
    mmdit_from_diffusers(theirs.config, state_dict)  # a bf16 copy of the same table is fine


def test_unsupported_diffusers_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="dual-attention"):
        mmdit_kwargs_from_diffusers_config({**SD3, "dual_attention_layers": [0, 1]})
    with pytest.raises(ValueError, match="caption_projection_dim"):
        mmdit_kwargs_from_diffusers_config({**SD3, "caption_projection_dim": 32})
    with pytest.raises(ValueError, match="qk_norm"):
        mmdit_kwargs_from_diffusers_config({**SD3, "qk_norm": "layer_norm"})


# -------------------------------------------------------------------------------------------------------
# Behaviour
# -------------------------------------------------------------------------------------------------------


def test_untrained_model_outputs_zero() -> None:
    """adaLN-Zero: zero modulations and a zero final projection."""
    model = MMDiT(**TINY)
    x, c_noise, context, pooled = inputs()
    assert torch.equal(model(x, c_noise, Conditioning(context, pooled)), torch.zeros_like(x))


def test_masked_text_tokens_are_ignored() -> None:
    model = randomize(MMDiT(**TINY)).eval()
    x, c_noise, context, pooled = inputs()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    other = torch.where(mask[..., None], context, torch.randn_like(context))  # changes only the masked tokens
    with torch.no_grad():
        out = model(x, c_noise, Conditioning(context, pooled, mask))
        torch.testing.assert_close(model(x, c_noise, Conditioning(other, pooled, mask)), out, rtol=0, atol=1e-6)
        assert not torch.allclose(model(x, c_noise, Conditioning(other, pooled)), out)
        assert torch.equal(model(x, c_noise, Conditioning(context, pooled, torch.ones_like(mask))),
                           model(x, c_noise, Conditioning(context, pooled)))


def test_gradient_checkpointing_gives_same_outputs_and_gradients() -> None:
    model = randomize(MMDiT(**TINY))
    x, c_noise, context, pooled = inputs(6, 10)
    block, calls = model.transformer_blocks[-1], []
    forward = block.forward
    block.forward = lambda *args: calls.append(1) or forward(*args)  # hooks do not see the recomputation
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = model(xi, c_noise, Conditioning(context, pooled))
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())  # no unused parameter (DDP)
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 3  # once without, twice (forward + recompute) with checkpointing
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[1][2], results[0][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused_with_the_numbers() -> None:
    model = MMDiT(**TINY)
    x, c_noise, context, pooled = inputs()
    with pytest.raises(ValueError, match=r"multiples of the patch size 2, got 8x9"):
        model(torch.randn(2, 4, 8, 9), c_noise, Conditioning(context, pooled))
    with pytest.raises(ValueError, match=r"\(B, L, 12\) \(context_dim\), got \(2, 5, 10\)"):
        model(x, c_noise, Conditioning(context[..., :10], pooled))
    with pytest.raises(ValueError, match=r"\(B, 10\) \(pooled_dim\), got \(2, 8\)"):
        model(x, c_noise, Conditioning(context, pooled[:, :8]))
    with pytest.raises(ValueError, match=r"\(B, 10\) \(pooled_dim\), got None"):
        model(x, c_noise, Conditioning(context))
    with pytest.raises(ValueError, match=r"a 34x8 latent is a 17x4 patch grid, larger than .* 16x16 patches"):
        model(torch.randn(2, 4, 34, 8), c_noise, Conditioning(context, pooled))


# -------------------------------------------------------------------------------------------------------
# Contract and presets
# -------------------------------------------------------------------------------------------------------


def test_backbone_contract_and_rebuild_from_config() -> None:
    model = randomize(hydra.utils.instantiate(OmegaConf.load(CONF / "mmdit_tiny.yaml"))).eval()
    assert isinstance(model, Backbone) and check_backbone(model) is model
    assert (model.in_channels, model.out_channels, model.context_dim, model.pooled_dim, model.size_multiple) == \
        (4, 4, 64, 64, 2)
    assert model.blocks() == list(model.transformer_blocks) and len(model.blocks()) == model.config["depth"]
    assert set(model.config) == set(inspect.signature(MMDiT).parameters)
    rebuilt = type(model)(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, c_noise, context, pooled = inputs(width_c=64, width_p=64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, c_noise, Conditioning(context, pooled)),
                           model(x, c_noise, Conditioning(context, pooled)))


@pytest.mark.parametrize("name", ["mmdit_tiny", "mmdit_base"])
def test_preset_parameter_count_matches_its_comment(name: str) -> None:
    text = (CONF / f"{name}.yaml").read_text()
    stated = int(re.search(r"\(([\d,]+)\) parameters", text).group(1).replace(",", ""))
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(cfg) - {"_target_"} == set(inspect.signature(MMDiT).parameters)  # every argument spelled out
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg)
        cond = Conditioning(torch.randn(2, 77, model.context_dim), torch.randn(2, model.pooled_dim))
        out = model(torch.randn(2, 4, 32, 24), torch.rand(2), cond)
    assert out.shape == (2, 4, 32, 24)
    assert sum(p.numel() for p in model.parameters()) == stated


def test_blocks_and_whole_model_compile_without_graph_breaks() -> None:
    """Regional compile (each block, fullgraph) and whole-model compile (fullgraph: the positional table is traced
    under compile) give the eager outputs; aot_eager keeps it quick on a CPU, inductor is the GPU tests' business."""
    model = randomize(MMDiT(**TINY)).eval()
    x, c_noise, context, pooled = inputs(6, 10)
    cond = Conditioning(context, pooled, torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        expected = model(x, c_noise, cond)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x, c_noise, cond),
                                   expected, rtol=1e-6, atol=1e-6)
        for block in model.blocks():
            block.compile(backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(model(x, c_noise, cond), expected, rtol=1e-6, atol=1e-6)
