"""The DiT: parity with diffusers' PixArtTransformer2DModel on converted random weights, conversion both ways,
positions at any size, gradient checkpointing, bad input, the backbone contract and the presets."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import hydra
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from omegaconf import OmegaConf

from ldm.models.backbone import Backbone, Conditioning, check_backbone
from ldm.models.convert_transformers import (
    convert_diffusers_dit,
    dit_from_diffusers,
    dit_kwargs_from_diffusers_config,
    dit_to_diffusers,
    load_diffusers_transformer,
)
from ldm.models.dit import DiT

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
# Two configs: PixArt's defaults at a tiny width, and one with interpolation_scale 2, 3 blocks and out = in channels.
PIXART = [
    dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
         cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, use_additional_conditions=False),
    dict(num_attention_heads=4, attention_head_dim=4, in_channels=4, out_channels=None, num_layers=3,
         cross_attention_dim=16, caption_channels=12, sample_size=12, patch_size=2, interpolation_scale=2,
         use_additional_conditions=False),
]
TINY = dict(in_channels=4, out_channels=4, hidden_size=16, depth=2, num_heads=2, context_dim=12, sample_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, the zero-initialised ones (outputs, gates) and the tables included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.5))
    return model


def pixart(config: dict) -> PixArtTransformer2DModel:
    return randomize(PixArtTransformer2DModel(**config)).eval()


def inputs(height: int = 8, width: int = 8, batch: int = 2, tokens: int = 5, width_c: int = 12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, height, width, generator=g)
    c_noise = torch.tensor([3.7, 812.25])[:batch]
    context = torch.randn(batch, tokens, width_c, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False  # the first prompt has 3 real tokens
    return x, c_noise, context, mask


# -------------------------------------------------------------------------------------------------------
# Parity and conversion
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", PIXART, ids=["pixart", "interp2_depth3"])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["8x8", "6x10"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_diffusers_weights_give_same_outputs(config: dict, size: tuple[int, int], masked: bool) -> None:
    theirs = pixart(config)
    ours = dit_from_diffusers(theirs.config, theirs.state_dict()).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x, c_noise, context, mask = inputs(*size)
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context, timestep=c_noise,
                          encoder_attention_mask=mask.long() if masked else None).sample
        out = ours(x, c_noise, Conditioning(context, None, mask if masked else None))
    assert expected.abs().max() > 0.1  # random weights: a non-trivial function
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_round_trip_through_diffusers_is_exact() -> None:
    ours = randomize(DiT(**TINY)).eval()
    config, state_dict = dit_to_diffusers(ours)
    theirs = PixArtTransformer2DModel(**config).eval()
    theirs.load_state_dict(state_dict, strict=True)
    back = convert_diffusers_dit(theirs.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert {**dit_kwargs_from_diffusers_config(theirs.config), "gradient_checkpointing": False} == ours.config
    x, c_noise, context, _ = inputs(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, c_noise, Conditioning(context)),
                                   theirs(x, encoder_hidden_states=context, timestep=c_noise).sample,
                                   rtol=1e-5, atol=1e-5)


def test_load_a_diffusers_folder(tmp_path: Path) -> None:
    theirs = pixart(PIXART[0])
    theirs.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    ours = load_diffusers_transformer(tmp_path, gradient_checkpointing=True)
    assert isinstance(ours, DiT) and ours.gradient_checkpointing
    x, c_noise, context, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x, c_noise, Conditioning(context)),
                                   theirs(x, encoder_hidden_states=context, timestep=c_noise).sample,
                                   rtol=1e-5, atol=1e-5)


def test_positions_at_any_size_equal_diffusers() -> None:
    theirs = pixart(PIXART[1])
    ours = dit_from_diffusers(theirs.config, theirs.state_dict())
    embed = theirs.pos_embed
    assert torch.equal(ours.pos_embed(6, 6, torch.device("cpu")), embed.pos_embed)  # the trained size: the buffer
    for h, w in [(3, 5), (16, 16), (9, 4)]:
        expected = get_2d_sincos_pos_embed(16, (h, w), base_size=embed.base_size,
                                           interpolation_scale=embed.interpolation_scale).float()[None]
        assert torch.equal(ours.pos_embed(h, w, torch.device("cpu")), expected)


def test_unsupported_diffusers_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="use_additional_conditions"):
        dit_kwargs_from_diffusers_config({**PIXART[0], "sample_size": 128, "use_additional_conditions": None})
    with pytest.raises(ValueError, match="caption_channels"):
        dit_kwargs_from_diffusers_config({**PIXART[0], "caption_channels": None})
    with pytest.raises(ValueError, match="norm_type"):
        dit_kwargs_from_diffusers_config({**PIXART[0], "norm_type": "ada_norm_zero"})


# -------------------------------------------------------------------------------------------------------
# Behaviour
# -------------------------------------------------------------------------------------------------------


def test_untrained_model_outputs_zero() -> None:
    """PixArt's init: zero final projection (and cross-attention outputs)."""
    model = DiT(**TINY)
    x, c_noise, context, _ = inputs()
    assert torch.equal(model(x, c_noise, Conditioning(context)), torch.zeros_like(x))
    assert all(not b.cross_attn.out.weight.any() for b in model.transformer_blocks)


def test_masked_tokens_are_ignored_and_a_scalar_noise_level_broadcasts() -> None:
    model = randomize(DiT(**TINY)).eval()
    x, c_noise, context, mask = inputs()
    other = torch.where(mask[..., None], context, torch.randn_like(context))  # changes only the masked tokens
    with torch.no_grad():
        out = model(x, c_noise, Conditioning(context, None, mask))
        torch.testing.assert_close(model(x, c_noise, Conditioning(other, None, mask)), out, rtol=0, atol=1e-6)
        assert not torch.allclose(model(x, c_noise, Conditioning(other)), out)
        # A prompt with no real token attends to all of them (diffusers' -10000 bias), not to NaNs.
        torch.testing.assert_close(model(x, c_noise, Conditioning(context, None, torch.zeros_like(mask))),
                                   model(x, c_noise, Conditioning(context)))
        torch.testing.assert_close(model(x, c_noise[1], Conditioning(context)),
                                   model(x, c_noise[1].expand(2), Conditioning(context)))


def test_gradient_checkpointing_gives_same_outputs_and_gradients() -> None:
    model = randomize(DiT(**TINY))
    x, c_noise, context, mask = inputs(6, 10)
    block, calls = model.transformer_blocks[0], []
    forward = block.forward
    block.forward = lambda *args: calls.append(1) or forward(*args)  # hooks do not see the recomputation
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = model(xi, c_noise, Conditioning(context, None, mask))
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())  # no unused parameter (DDP)
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    assert len(calls) == 3  # once without, twice (forward + recompute) with checkpointing
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[1][2], results[0][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused_with_the_numbers() -> None:
    model = DiT(**TINY)
    x, c_noise, context, mask = inputs()
    with pytest.raises(ValueError, match=r"multiples of the patch size 2, got 7x8"):
        model(x[..., :7, :], c_noise, Conditioning(context))
    with pytest.raises(ValueError, match=r"\(B, L, 12\) \(context_dim\), got \(2, 5, 10\)"):
        model(x, c_noise, Conditioning(context[..., :10]))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\), got \(2, 3, 8, 8\)"):
        model(x[:, :3], c_noise, Conditioning(context))
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 5\), got \(2, 4\)"):
        model(x, c_noise, Conditioning(context, None, mask[:, :4]))


# -------------------------------------------------------------------------------------------------------
# Contract and presets
# -------------------------------------------------------------------------------------------------------


def test_backbone_contract_and_rebuild_from_config() -> None:
    model = randomize(hydra.utils.instantiate(OmegaConf.load(CONF / "dit_tiny.yaml"))).eval()
    assert isinstance(model, Backbone) and check_backbone(model) is model
    assert (model.in_channels, model.out_channels, model.context_dim, model.pooled_dim, model.size_multiple) == \
        (4, 4, 64, None, 2)
    assert model.blocks() == list(model.transformer_blocks) and len(model.blocks()) == model.config["depth"]
    assert set(model.config) == set(inspect.signature(DiT).parameters)
    rebuilt = type(model)(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, c_noise, context, _ = inputs(width_c=64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, c_noise, Conditioning(context)), model(x, c_noise, Conditioning(context)))


@pytest.mark.parametrize("name", ["dit_tiny", "dit_b2", "dit_xl2"])
def test_preset_parameter_count_matches_its_comment(name: str) -> None:
    text = (CONF / f"{name}.yaml").read_text()
    stated = int(re.search(r"\(([\d,]+)\) parameters", text).group(1).replace(",", ""))
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(cfg) - {"_target_"} == set(inspect.signature(DiT).parameters)  # every argument spelled out
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg)
        out = model(torch.randn(2, 4, 32, 24), torch.rand(2), Conditioning(torch.randn(2, 77, model.context_dim)))
    assert out.shape == (2, 4, 32, 24)
    assert sum(p.numel() for p in model.parameters()) == stated


def test_blocks_and_whole_model_compile_without_graph_breaks() -> None:
    """Regional compile (each block, fullgraph) and whole-model compile (fullgraph: the positional table is traced
    under compile) give the eager outputs; aot_eager keeps it quick on a CPU, inductor is the GPU tests' business."""
    model = randomize(DiT(**TINY)).eval()
    x, c_noise, context, mask = inputs(6, 10)
    cond = Conditioning(context, None, mask)
    with torch.no_grad():
        expected = model(x, c_noise, cond)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x, c_noise, cond),
                                   expected, rtol=1e-6, atol=1e-6)
        for block in model.blocks():
            block.compile(backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(model(x, c_noise, cond), expected, rtol=1e-6, atol=1e-6)
