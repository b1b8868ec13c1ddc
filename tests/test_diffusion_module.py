"""Stage 2 wiring: parts must fit, captions drop at the configured rate, the autoencoder stays frozen."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as L
import pytest
import torch

from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.parameterization import VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import CosineSchedule
from ldm.lightning.diffusion_module import DiffusionModule
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.unet import UNet


def parts(latent_channels: int = 4, context_dim: int = 64, stats: bool = True):
    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=latent_channels,
                       mid_attention=False, norm_groups=4)
    if stats:
        ae.set_latent_stats(0.7, torch.zeros(latent_channels), torch.ones(latent_channels))
    unet = UNet(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), num_heads=None, head_channels=8, context_dim=context_dim, norm_groups=4)
    text = OpenCLIPTextEncoder(model_name="ldm-tiny-text", pretrained=None)
    return ae, unet, text


def module(cond_drop_prob: float = 0.1, **kw) -> DiffusionModule:
    ae, unet, text = parts(**kw)
    schedule = CosineSchedule()
    process = DiffusionProcess(schedule, VPrediction(schedule))
    return DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae, process=process, loss=DenoisingLoss(),
                           optimizer=partial(torch.optim.AdamW, lr=1e-3), cond_drop_prob=cond_drop_prob)


def test_mismatched_latent_channels_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="3 latent channels but the UNet takes in_channels=4"):
        module(latent_channels=3)


def test_mismatched_context_dim_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="64-dim token states but the UNet's context_dim=32"):
        module(context_dim=32)


def test_autoencoder_without_latent_statistics_is_refused() -> None:
    with pytest.raises(ValueError, match="no latent statistics"):
        module(stats=False)


def test_caption_dropout_rate_and_null_embedding() -> None:
    m = module(cond_drop_prob=0.3)
    torch.manual_seed(0)
    captions = ["a small red circle on a blue background"] * 2000
    cond, dropped = m.embed_captions(captions, 0.3)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    null, full = m.text_encoder.encode([""]), m.text_encoder.encode(captions[:1])
    for field in ("tokens", "pooled", "mask"):  # every field of the conditioning drops together
        got, empty, caption = getattr(cond, field), getattr(null, field), getattr(full, field)
        torch.testing.assert_close(got[dropped], empty.expand(int(dropped.sum()), *empty.shape[1:]))
        torch.testing.assert_close(got[~dropped], caption.expand(int((~dropped).sum()), *caption.shape[1:]))


def test_training_updates_only_the_unet_and_checkpoints_leave_frozen_parts_out() -> None:
    m = module()
    ae_before = {k: v.clone() for k, v in m.autoencoder.state_dict().items()}
    unet_before = [p.clone() for p in m.backbone.parameters()]
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "caption": ["a red square"] * 4}
            for _ in range(3)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.global_step == 3
    assert all(torch.equal(v, m.autoencoder.state_dict()[k]) for k, v in ae_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, m.backbone.parameters()))
    assert not m.autoencoder.training
    keys = m.state_dict().keys()
    assert not any(k.startswith("autoencoder.") for k in keys)
    # a randomly initialised text tower cannot be rebuilt from a file, so its weights stay in the checkpoint
    assert {k.split(".")[0] for k in keys} == {"backbone", "text_encoder"}
    m.load_state_dict(m.state_dict())  # the reduced state dict loads back strictly


def test_checkpoints_leave_out_a_text_encoder_loaded_from_pretrained_weights(tmp_path) -> None:
    m = module()
    torch.save({"state_dict": {f"text.{k}": v for k, v in m.text_encoder.text.state_dict().items()}},
               tmp_path / "text.pt")
    m.text_encoder = OpenCLIPTextEncoder(model_name="ldm-tiny-text", pretrained=str(tmp_path / "text.pt"))
    keys = m.state_dict().keys()
    assert keys and all(k.startswith("backbone.") for k in keys)
    m.load_state_dict(m.state_dict())


def test_compile_and_channels_last_switches_keep_outputs_and_checkpoint_names() -> None:
    plain = module()
    ae, unet, text = parts()
    unet.load_state_dict(plain.backbone.state_dict())
    schedule = CosineSchedule()
    fast = DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae,
                           process=DiffusionProcess(schedule, VPrediction(schedule)), loss=DenoisingLoss(),
                           optimizer=partial(torch.optim.AdamW, lr=1e-3), compile_backbone=True,
                           compile_backend="eager", channels_last=True)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for p in fast.backbone.parameters():  # the SD init zeroes some convs: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    plain.backbone.load_state_dict(fast.backbone.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 64)
    torch.testing.assert_close(fast.backbone(x, t, ctx), plain.backbone(x, t, ctx), rtol=1e-4, atol=1e-5)
    assert fast.backbone.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_missing_autoencoder_export_is_a_clear_error(tmp_path) -> None:
    from ldm.models.autoencoder.export import load_autoencoder

    with pytest.raises(FileNotFoundError, match="Train stage 1 first"):
        load_autoencoder(tmp_path / "nowhere")


def test_fsdp_with_a_trainable_text_encoder_is_refused_by_name() -> None:
    """Only the UNet is sharded; a trainable text tower's gradients would never be reduced across ranks."""
    m = module()
    m.text_encoder.requires_grad_(True)
    m._device_mesh = object()  # what trainer=fsdp sets before configure_model (the mesh is not reached)
    with pytest.raises(ValueError, match=r"trainer=fsdp shards only the backbone, but \['text_encoder\."):
        m.configure_model()
    m._device_mesh = None  # any other strategy: nothing to do
    m.configure_model()


def test_checkpoints_record_the_autoencoder_and_resuming_with_another_is_refused() -> None:
    from ldm.models.autoencoder.export import weights_hash

    trained = module()
    checkpoint: dict = {}
    trained.on_save_checkpoint(checkpoint)
    assert checkpoint["ldm"]["autoencoder_sha256"] == weights_hash(trained.autoencoder)
    module().on_load_checkpoint(checkpoint)  # the same autoencoder: fine
    other = module()
    with torch.no_grad():
        next(other.autoencoder.parameters()).add_(0.01)
    other.autoencoder_sha256 = weights_hash(other.autoencoder)
    with pytest.raises(ValueError, match=rf"trained with autoencoder {checkpoint['ldm']['autoencoder_sha256']}, but "
                                         rf"model.autoencoder.path holds autoencoder {other.autoencoder_sha256}"):
        other.on_load_checkpoint(checkpoint)
    del checkpoint["ldm"]["autoencoder_sha256"]  # written before the hash was recorded: nothing to check
    other.on_load_checkpoint(checkpoint)


def test_a_checkpoint_from_before_the_backbone_rename_still_loads() -> None:
    """Checkpoints written when the denoiser was `unet` (keys, architecture record, EMA attribute) load unchanged."""
    trained = module()
    checkpoint = {"state_dict": trained.state_dict(), "callbacks": {"EMA": {"attribute": "backbone"}}}
    trained.on_save_checkpoint(checkpoint)
    old = {"state_dict": {k.replace("backbone.", "unet.", 1): v for k, v in checkpoint["state_dict"].items()},
           "callbacks": {"EMA": {"attribute": "unet"}},
           "ldm": {**{k: v for k, v in checkpoint["ldm"].items() if k != "backbone"},
                   "unet": {k: v for k, v in checkpoint["ldm"]["backbone"].items() if k != "_target_"}}}
    fresh = module()
    fresh.on_load_checkpoint(old)  # Lightning calls this before load_state_dict
    fresh.load_state_dict(old["state_dict"])
    assert old["callbacks"]["EMA"]["attribute"] == "backbone" and old["ldm"]["backbone"] == checkpoint["ldm"]["backbone"]
    for a, b in zip(fresh.backbone.parameters(), trained.backbone.parameters()):
        assert torch.equal(a, b)
    other = {**old, "ldm": {**old["ldm"], "backbone": {**old["ldm"]["backbone"], "_target_": "ldm.models.dit.DiT"}}}
    with pytest.raises(ValueError, match=r"backbone architecture does not match.*_target_: 'ldm.models.dit.DiT'"):
        module().on_load_checkpoint(other)


def test_a_resolution_the_backbone_cannot_take_is_refused_at_start_up() -> None:
    from ldm.lightning.diffusion_module import check_latent_size
    from ldm.models.dit import DiT

    m = module()  # f = 4, UNet size multiple 2
    check_latent_size(32, m.autoencoder, m.backbone)
    with pytest.raises(ValueError, match=r"data.resolution=36 gives 9x9 latents \(autoencoder factor 4\), but the UNet "
                                         r"needs latent sides that are multiples of 2: .* multiple of 8, e.g. 32"):
        check_latent_size(36, m.autoencoder, m.backbone)
    dit = DiT(hidden_size=32, depth=1, num_heads=2, context_dim=64, patch_size=4)
    with pytest.raises(ValueError, match=r"the DiT needs latent sides that are multiples of 4: .* e.g. 48"):
        check_latent_size(44, m.autoencoder, dit)


def test_the_process_is_recorded_and_a_checkpoint_of_another_process_is_refused() -> None:
    from ldm.diffusion.parameterization import FlowPrediction
    from ldm.diffusion.schedules import RectifiedFlow
    from ldm.diffusion.shift import TimestepShift

    flow = module()
    flow.process = DiffusionProcess(RectifiedFlow(), FlowPrediction(), TimestepShift(shift=3.0))
    checkpoint: dict = {}
    flow.on_save_checkpoint(checkpoint)
    assert checkpoint["ldm"]["process"]["parameterization"] == "FlowPrediction(schedule=None, timestep_scale=1000.0)"
    assert checkpoint["ldm"]["process"]["shift"]["shift"] == 3.0
    with pytest.raises(ValueError, match=r"diffusion process .* parameterization: 'FlowPrediction.*' -> 'VPrediction"):
        module().on_load_checkpoint(checkpoint)  # a flow checkpoint into a v-prediction run


def test_regional_compile_wraps_each_block_and_keeps_outputs_and_names() -> None:
    """compile_backbone=blocks: each of the backbone's blocks() compiled in place (aot_eager: capture, no codegen)."""
    plain = module()
    ae, unet, text = parts()
    schedule = CosineSchedule()
    regional = DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae, loss=DenoisingLoss(),
                               process=DiffusionProcess(schedule, VPrediction(schedule)),
                               optimizer=partial(torch.optim.AdamW, lr=1e-3), compile_backbone="blocks",
                               compile_backend="aot_eager")
    assert all(block._compiled_call_impl is not None for block in regional.backbone.blocks())
    assert regional.backbone._compiled_call_impl is None  # the whole forward stays eager
    for p in regional.backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    plain.backbone.load_state_dict(regional.backbone.state_dict())  # the same names
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 64)
    torch.testing.assert_close(regional.backbone(x, t, ctx), plain.backbone(x, t, ctx), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile_backbone must be false, true, 'full' or 'blocks', got 'some'"):
        DiffusionModule(backbone=parts()[1], text_encoder=text, autoencoder=ae, loss=DenoisingLoss(),
                        process=DiffusionProcess(schedule, VPrediction(schedule)),
                        optimizer=partial(torch.optim.AdamW, lr=1e-3), compile_backbone="some")
