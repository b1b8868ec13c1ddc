"""The UNet on its own: presets, shapes, init, conditioning, gradient checkpointing, channels_last, torch.compile."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from omegaconf import OmegaConf

from ldm.models.embeddings import TimestepEmbedding, timestep_embedding
from ldm.models.unet.blocks import SpatialTransformer, heads_for
from ldm.models.unet.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
# Preset -> (parameter count, latent size, context width).
PRESETS = {"sd2": (865_910_724, 64, 1024), "base": (156_770_884, 32, 1024), "tiny": (1_077_572, 8, 64)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> UNet:
    cfg = OmegaConf.load(CONF / "unet_tiny.yaml")
    return hydra.utils.instantiate(cfg, **overrides)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (zero-initialised ones included) by a random value of sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(batch: int = 2, size: int = 8, context_dim: int = 64, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    c_noise = torch.rand(batch, generator=g) * 999
    return x, c_noise, torch.randn(batch, tokens, context_dim, generator=g)


# -------------------------------------------------------------------------------------------------------
# Presets and construction
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_on_meta_device(name: str) -> None:
    """Every preset builds from its YAML, has the documented size and maps latents to latents (shapes only)."""
    n_params, size, context_dim = PRESETS[name]
    with torch.device("meta"):
        model = hydra.utils.instantiate(OmegaConf.load(CONF / f"unet_{name}.yaml"))
        assert sum(p.numel() for p in model.parameters()) == n_params
        out = model(torch.randn(2, 4, size, size), torch.rand(2), torch.randn(2, 77, context_dim))
    assert out.shape == (2, 4, size, size)
    assert isinstance(model, UNet)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"unet_{name}.yaml"))
    cfg.pop("_target_")
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()} == model.config


def test_config_rebuilds_the_same_architecture() -> None:
    model = tiny()
    clone = UNet(**model.config)
    clone.load_state_dict(model.state_dict(), strict=True)
    assert model.config["attention_levels"] == (0, 1) and model.config["context_dim"] == 64


def test_zero_init_outputs_zero_and_residual_branches_start_at_identity() -> None:
    model = tiny()
    x, c_noise, context = inputs()
    assert torch.count_nonzero(model(x, c_noise, context)) == 0
    for m in model.modules():
        if isinstance(m, SpatialTransformer):  # zero proj_out: the block passes its input through
            h = torch.randn(2, m.norm.num_channels, 4, 4)
            torch.testing.assert_close(m(h, context), h)


def test_heads_from_count_or_width() -> None:
    assert heads_for(320, None, 64) == 5 and heads_for(1280, None, 64) == 20  # SD2
    assert heads_for(640, 8, None) == 8  # SD1
    for bad in [(64, None, None), (64, 4, 16), (96, None, 64), (96, 5, None)]:
        with pytest.raises(ValueError):
            heads_for(*bad)
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channel_mult=(1, 2), attention_levels=(2,))


def test_rejects_latents_not_divisible_by_the_downsampling() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 4, 9, 8), torch.zeros(1), torch.randn(1, 7, 64))


# -------------------------------------------------------------------------------------------------------
# Embeddings and conditioning
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip,shift,dim", [(True, 0.0, 320), (False, 1.0, 64), (True, 1.0, 33)])
def test_timestep_embedding_matches_diffusers(flip: bool, shift: float, dim: int) -> None:
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(timestep_embedding(t, dim, flip_sin_to_cos=flip, shift=shift), expected, rtol=0, atol=0)
    emb = timestep_embedding(t, dim, flip_sin_to_cos=flip, shift=shift)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    first = emb[:, :half] if not flip else emb[:, half : 2 * half]  # the sin half
    torch.testing.assert_close(first[:, 0], torch.sin(t))  # frequency 1 in the first column


def test_time_embedding_accepts_long_and_float_timesteps() -> None:
    embed = TimestepEmbedding(32, 128)
    t = torch.tensor([0, 10, 999])
    torch.testing.assert_close(embed(t), embed(t.double()))
    assert embed.to(torch.bfloat16)(t, dtype=torch.bfloat16).dtype == torch.bfloat16  # a bf16 net gets bf16 input


def test_c_noise_scalar_broadcasts_and_dtypes_agree() -> None:
    model = randomize(tiny()).eval()
    x, _, context = inputs()
    with torch.no_grad():
        batch = model(x, torch.tensor([250, 250]), context)
        torch.testing.assert_close(model(x, torch.tensor(250.0), context), batch)
        torch.testing.assert_close(model(x, torch.tensor([250.0, 250.0], dtype=torch.float64), context), batch)


def test_output_depends_on_x_noise_level_and_context() -> None:
    model = randomize(tiny())
    x, c_noise, context = inputs()
    x.requires_grad_(True)
    context.requires_grad_(True)
    out = model(x, c_noise, context)
    gx, gc = torch.autograd.grad(out.square().sum(), (x, context))
    assert gx.abs().sum() > 0 and gc.abs().sum() > 0
    assert not torch.allclose(model(x, c_noise + 100, context), out)
    # Samples do not mix: the first output ignores the second sample's context.
    context2 = context.detach().clone()
    context2[1] += 1
    torch.testing.assert_close(model(x, c_noise, context2)[0], out[0])


def test_tiny_unet_fits_a_batch() -> None:
    """Zero-init does not block learning: 60 AdamW steps on one batch cut the MSE by more than half."""
    torch.manual_seed(0)
    model = tiny()
    x, c_noise, context = inputs(batch=8)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(x, c_noise, context), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# -------------------------------------------------------------------------------------------------------
# Execution options: checkpointing, channels_last, compile
# -------------------------------------------------------------------------------------------------------


def _output_and_grads(model: UNet, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, c_noise, context = inputs()
    torch.manual_seed(seed)  # dropout draws
    out = model(x, c_noise, context)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_gradient_checkpointing_gives_identical_outputs_and_grads() -> None:
    # dropout > 0: the recomputation in backward must replay the same dropout masks.
    model = randomize(tiny(dropout=0.1)).train()
    out, grads = _output_and_grads(model, seed=3)
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt = _output_and_grads(model, seed=3)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for g_ckpt, g in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-6, atol=1e-7)


def test_channels_last_gives_same_output() -> None:
    model = randomize(tiny()).eval()
    x, c_noise, context = inputs()
    with torch.no_grad():
        expected = model(x, c_noise, context)
        model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), c_noise, context)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compiles_to_one_graph() -> None:
    """`fullgraph=True` fails on any graph break, e.g. data-dependent Python control flow in forward."""
    torch._dynamo.reset()
    model = randomize(tiny()).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, c_noise, context = inputs()
    expected = model(x, c_noise, context)
    out = compiled(x, c_noise, context)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()  # the backward graph traces too
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor needs ~2.5 min to compile the tiny UNet on "
                    "the 2-core CPU (measured); test_compiles_to_one_graph covers capture, this covers codegen")
def test_inductor_bf16_on_gpu() -> None:
    torch._dynamo.reset()
    model = randomize(tiny()).cuda()
    x, c_noise, context = (t.cuda() for t in inputs())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x, c_noise, context).float()
        out = torch.compile(model, fullgraph=True)(x, c_noise, context).float()
    assert math.isfinite(out.abs().max().item())
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    torch._dynamo.reset()
