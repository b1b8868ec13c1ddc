"""A LoRA run (model.lora): only adapters train and the base backbone stays bit-identical, the optimizer and EMA see
the adapters, resuming continues exactly, `init_from` loads base weights before adapters are added, and a LoRA run's
checkpoint gives merged weights to every reader (sampling, exports, the next run's init_from)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from test_diffusion_module import parts

from ldm.callbacks.ema import EMA
from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.parameterization import VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import CosineSchedule
from ldm.inference.loading import backbone_weights
from ldm.lightning.diffusion_module import DiffusionModule
from ldm.models.lora import LoRA, adapter_state_dict, base_state_dict, merge_lora, rebuild


def module(lora: LoRA | None = LoRA(rank=4), **kw) -> DiffusionModule:
    ae, unet, text = parts()
    for p in unet.parameters():  # SD's zero-initialised output convs would hide the adapters' effect
        torch.nn.init.normal_(p, std=0.05)
    schedule = CosineSchedule()
    return DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae,
                           process=DiffusionProcess(schedule, VPrediction(schedule)), loss=DenoisingLoss(),
                           optimizer=partial(torch.optim.AdamW, lr=1e-2), cond_drop_prob=0.0, lora=lora, **kw)


def batches(n: int = 2) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "caption": ["a red square"] * 2}
            for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=None)


def fit(m: DiffusionModule, epochs: int, callbacks: list, tmp_path: Path, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=callbacks,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(m, train_dataloaders=batches(), ckpt_path=ckpt_path)
    return trainer


def test_a_lora_run_changes_only_adapter_weights(tmp_path: Path, one_thread) -> None:
    m = module()
    base_before = {k: v.clone() for k, v in base_state_dict(m.backbone).items()}
    adapters_before = {k: v.clone() for k, v in adapter_state_dict(m.backbone).items()}
    text_before = {k: v.clone() for k, v in m.text_encoder.state_dict().items()}
    ema = EMA(decay=0.5)
    trainer = fit(m, 2, [ema], tmp_path)
    assert trainer.global_step == 4
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in m.backbone.named_parameters() if ".lora_" in n}
    assert all(torch.equal(v, base_state_dict(m.backbone)[k]) for k, v in base_before.items())  # bit-identical
    assert all(torch.equal(v, m.text_encoder.state_dict()[k]) for k, v in text_before.items())
    after = adapter_state_dict(m.backbone)
    assert all(not torch.equal(v, after[k]) for k, v in adapters_before.items() if ".lora_B." in k)
    # the EMA averages the adapters; the frozen weights are views of the live ones, not copies
    live = dict(m.backbone.named_parameters())
    lora_b = next(k for k in live if ".lora_B." in k)
    assert not torch.equal(ema.ema[lora_b], live[lora_b])
    frozen = next(k for k, p in live.items() if not p.requires_grad)
    assert ema.ema[frozen].data_ptr() == live[frozen].data_ptr()


def test_posthoc_ema_of_a_lora_run_averages_only_the_adapters(tmp_path: Path, one_thread) -> None:
    from ldm.callbacks.posthoc_ema import PostHocEMA
    from ldm.posthoc_ema import list_snapshots, reconstruct

    m = module()
    posthoc = PostHocEMA(sigma_rels=(0.05, 0.2), snapshot_every=2, snapshot_dir=str(tmp_path / "snapshots"))
    fit(m, 2, [posthoc], tmp_path)
    live = dict(m.backbone.named_parameters())
    frozen = next(k for k, p in live.items() if not p.requires_grad)
    lora_b = next(k for k in live if ".lora_B." in k)
    for average in posthoc.averages:  # frozen weights: views of the live tensors, no copy per profile
        assert average[frozen].data_ptr() == live[frozen].data_ptr()
        assert average[lora_b].data_ptr() != live[lora_b].data_ptr()
    assert len(list_snapshots(tmp_path / "snapshots")) == 2
    rebuilt = reconstruct(tmp_path / "snapshots", 0.1).state_dict
    assert torch.equal(rebuilt[frozen], live[frozen])  # taken as it is, not a least-squares mix of the snapshots
    assert not torch.equal(rebuilt[lora_b], live[lora_b])


class SeedEachStep(L.Callback):
    """The same noise at step n of any run: what is under test is the adapters', optimizer's and EMA's state, not
    the RNG's (tests/test_resume.py covers that through train.py)."""

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        torch.manual_seed(trainer.global_step)


def test_resume_continues_exactly_and_another_lora_is_refused(tmp_path: Path, one_thread) -> None:
    straight, straight_ema = module(), EMA(decay=0.5)
    fit(straight, 2, [straight_ema, SeedEachStep()], tmp_path / "a")
    first = module()
    trainer = fit(first, 1, [EMA(decay=0.5), SeedEachStep()], tmp_path / "b")
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, ema = module(), EMA(decay=0.5)
    fit(resumed, 2, [ema, SeedEachStep()], tmp_path / "c", ckpt_path=str(tmp_path / "half.ckpt"))
    expected = straight.backbone.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.backbone.state_dict().items())
    assert not all(torch.equal(v, expected[k]) for k, v in first.backbone.state_dict().items())
    assert ema.num_updates == 4 and all(torch.equal(v, straight_ema.ema[k]) for k, v in ema.ema.items())
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert ckpt["ldm"]["lora"] == LoRA(rank=4).describe()
    with pytest.raises(ValueError, match=r"trained with LoRA \{'rank': 4.*this model has \{'rank': 8"):
        module(LoRA(rank=8)).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="this model has None"):
        module(None).on_load_checkpoint(ckpt)


def test_init_from_loads_base_weights_then_adds_adapters_and_a_lora_run_reads_merged(tmp_path: Path) -> None:
    plain = module(None)
    trainer = fit(plain, 1, [], tmp_path / "plain")
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    started = module(LoRA(rank=4, init="random"), init_from=str(tmp_path / "plain.ckpt"))
    own = plain.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in base_state_dict(started.backbone).items())
    assert adapter_state_dict(started.backbone)  # adapters on top
    trainer = fit(started, 1, [], tmp_path / "lora")
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    weights, which = backbone_weights(tmp_path / "lora.ckpt")
    assert which == "raw" and set(weights) == set(own)  # plain names: the adapters merged
    expected = merge_lora(started.backbone).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in weights.items())


def test_fsdp_with_lora_is_refused_by_name() -> None:
    m = module()
    m._device_mesh = object()  # what trainer=fsdp sets before configure_model
    with pytest.raises(ValueError, match="model.lora with trainer=fsdp is not supported: use trainer=ddp"):
        m.configure_model()


def test_rebuild_refuses_weights_of_another_architecture() -> None:
    m = module()
    state = m.backbone.state_dict()
    arch = {"_target_": "ldm.models.unet.unet.UNet", **m.backbone.config, "attention_levels": [0, 1]}
    with pytest.raises(ValueError, match=r"do not fit a UNet with adapters .*missing \['down.0.attn"):
        rebuild(state, arch, LoRA(rank=4).describe())


@pytest.mark.slow  # dynamo traces every block: ~10-20 s on 2 cores
def test_regional_compile_wraps_the_adapted_blocks(one_thread) -> None:
    """compile_backbone=blocks compiles each block after the adapters are in: same outputs, same checkpoint names."""
    plain = module(LoRA(rank=4, init="random"))
    compiled = module(LoRA(rank=4, init="random"), compile_backbone="blocks", compile_backend="eager")
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    x, c_noise, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled.backbone(x, c_noise, context), plain.backbone(x, c_noise, context))
    assert any(".lora_A." in n for n, p in compiled.backbone.named_parameters() if p.requires_grad)
