"""The stage-1 training loop in-process: NaN steps are skipped and counted, then stop the run; EMA is exact."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as L
import pytest
import torch
from conftest import Lin

from ldm.callbacks.ema import EMA
from ldm.lightning.autoencoder_module import AutoencoderModule
from ldm.lightning.nonfinite import NonFiniteGuard
from ldm.models.autoencoder.discriminator import NLayerDiscriminator
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.autoencoder.latent_stats import LatentStats
from ldm.models.autoencoder.losses import AutoencoderLoss


def tiny_module(disc_start: int = 0, max_nonfinite_steps: int = 3) -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(
        autoencoder=AutoencoderKL(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                  mid_attention=False, norm_groups=4),
        loss=AutoencoderLoss(perceptual=None, perceptual_weight=0.0, disc_start=disc_start),
        discriminator=NLayerDiscriminator(in_channels=3, ndf=8, n_layers=2),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), disc_optimizer=partial(torch.optim.AdamW, lr=1e-3),
        max_nonfinite_steps=max_nonfinite_steps,
    )


def batches(n: int, nan_at: set[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
        if i in nan_at:
            x[0, 0, 0, 0] = float("nan")
        out.append({"image": x, "caption": [""] * 4, "key": [str(i)] * 4, "skips": {}})
    return out


def fit(module: L.LightningModule, data: list[dict], callbacks: list | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=callbacks or [])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer


def test_nan_batch_is_skipped_and_counted_weights_stay_finite() -> None:
    module = tiny_module()
    trainer = fit(module, batches(5, nan_at={2}))
    assert module.guard.total == 1 and module.guard.consecutive == 0
    assert trainer.global_step == 4  # 5 batches, one skipped: the step counter only counts applied steps
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skipped_step_leaves_weights_untouched() -> None:
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, batches(1, nan_at={0}))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_persistent_nan_stops_with_a_clear_message() -> None:
    with pytest.raises(RuntimeError, match="consecutive training steps had a NaN/Inf"):
        fit(tiny_module(max_nonfinite_steps=3), batches(6, nan_at={1, 2, 3, 4}))


def test_guard_rejects_bad_settings_and_inf() -> None:
    with pytest.raises(ValueError):
        NonFiniteGuard(0)
    guard = NonFiniteGuard(5)
    assert guard.all_finite(None, torch.tensor(1.0))
    assert not guard.all_finite(None, torch.tensor(1.0), torch.tensor(float("inf")))


def test_discriminator_gets_only_its_own_gradient() -> None:
    """One backward updates both nets; the generator loss must not leak into the discriminator's grads."""
    module = tiny_module(disc_start=0)
    x = batches(1, set())[0]["image"]
    recon, posterior = module.autoencoder(x)
    from ldm.lightning.autoencoder_module import frozen

    with frozen(module.discriminator):
        logits_fake = module.discriminator(recon)
    g_loss, _ = module.loss.generator_loss(x, recon, posterior, logits_fake, 0, module.autoencoder.last_layer)
    g_loss.backward()
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert module.autoencoder.last_layer.grad is not None


def test_ema_matches_a_hand_computed_average_and_round_trips() -> None:
    torch.manual_seed(0)
    module, ema = Lin(), EMA(attribute="net", decay=0.5, warmup=False)
    start = [p.detach().clone() for p in module.net.parameters()]
    expected = [p.clone() for p in start]

    class Track(L.Callback):  # runs before EMA's hook in the callback list order
        def on_train_batch_end(self, trainer, pl_module, *args):
            for e, p in zip(expected, pl_module.net.parameters()):
                e.mul_(0.5).add_(p.detach(), alpha=0.5)

    fit(module, [torch.randn(4, 3) for _ in range(5)], callbacks=[Track(), ema])
    for e, name in zip(expected, ("weight", "bias")):
        torch.testing.assert_close(ema.ema[name], e)
    state = ema.state_dict()
    assert state["num_updates"] == 5
    restored = EMA(attribute="net", decay=0.5)
    restored.load_state_dict(state)
    restored.on_fit_start(None, Lin())  # the copy is made at fit start; the saved average is applied to it
    assert restored.ema.keys() == ema.ema.keys()
    for name in ema.ema:
        torch.testing.assert_close(restored.ema[name], ema.ema[name])
    assert restored.num_updates == 5


def test_latent_stats_match_torch_and_sum_across_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 1.0
    stats = LatentStats(4)
    stats.update(z[:3])
    other = LatentStats(4)
    other.update(z[3:])
    # fake a 2-rank all-reduce: each "rank" adds the other's packed moments
    packed_other = torch.cat([other.count[None], other.sum, other.sumsq])
    stats.reduce(lambda t: t + packed_other)
    scale, mean, std = stats.finalize()
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, z.transpose(0, 1).reshape(4, -1).std(dim=1, unbiased=False), rtol=1e-4,
                               atol=1e-5)
    assert scale == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-5)


def test_data_health_sums_skips_and_logs_every_cause(tmp_path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from ldm.callbacks.data_health import DataHealth
    from ldm.data.webdataset import SKIP_CAUSES

    class Skipping(Lin):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["x"], batch_idx)

    data = [{"x": torch.randn(4, 3), "skips": {"corrupt_image": 2, "bad_caption": i % 2}} for i in range(4)]
    health = DataHealth(every_n_steps=2)
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[health])
    trainer.fit(Skipping(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert health.local == {"corrupt_image": 8, "bad_caption": 2}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    last = [r for r in rows if r.get("data/skipped_corrupt_image")][-1]
    assert float(last["data/skipped_corrupt_image"]) == 8 and float(last["data/skipped_bad_caption"]) == 2
    assert all(f"data/skipped_{c}" in rows[0] for c in SKIP_CAUSES)
