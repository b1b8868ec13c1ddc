"""WebDataModule: fail-fast setup and a short Lightning fit that sees per-epoch reshuffled shards."""

import lightning.pytorch as L
import pytest
import torch

from ldm.data.builtin import write_builtin
from ldm.data.datamodule import WebDataModule
from ldm.data.webdataset import SKIP_CAUSES


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_builtin("shapes", tmp_path_factory.mktemp("shapes"), num_samples=60, resolution=16, seed=0,
                         shard_size=6, num_val=12)


class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_keys: dict[int, list[list[str]]] = {}
        self.val_batches = 0
        self.skips = dict.fromkeys(SKIP_CAUSES, 0)

    def training_step(self, batch, batch_idx):
        assert batch["image"].shape[1:] == (3, 16, 16)
        self.train_keys.setdefault(self.current_epoch, []).append(batch["key"])
        for cause, n in batch["skips"].items():
            self.skips[cause] += int(n)
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fit_two_epochs(shapes, tmp_path):
    dm = WebDataModule(shapes.train_shards, shapes.val_shards, resolution=16, batch_size=4, num_workers=0, seed=3)
    probe = _Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert set(probe.train_keys) == {0, 1}
    for epoch, batches in probe.train_keys.items():
        keys = [k for b in batches for k in b]
        assert len(batches) == dm.train_loader.batches_per_rank(epoch)[0]  # Lightning ran the whole epoch
        assert len(keys) == len(set(keys))
    assert dm.train_loader.epoch == 1  # Lightning's set_epoch hook reached the loader
    assert probe.train_keys[0] != probe.train_keys[1]
    assert probe.val_batches == 2 * 3  # 12 val samples, batch 4, partial batches kept on one rank
    assert probe.skips == dict.fromkeys(SKIP_CAUSES, 0)


def test_setup_reads_rank_and_fails_fast(shapes, tmp_path):
    dm = WebDataModule(shapes.train_shards, None, resolution=16, batch_size=4, num_workers=2)
    dm.setup("fit")
    assert (dm.train_loader.rank, dm.train_loader.world_size, len(dm.train_loader.urls)) == (0, 1, 8)
    assert dm.val_dataloader() == []
    missing = WebDataModule(str(tmp_path / "nope-{00000..00003}.tar"), None, resolution=16, batch_size=4)
    with pytest.raises(FileNotFoundError, match="nope"):
        missing.setup("fit")
    one_val_shard = WebDataModule(shapes.train_shards, shapes.val_shards, resolution=16, batch_size=4,
                                  num_workers=2)
    one_val_shard.setup("validate")  # 2 val shards, 2 workers requested: fits
    assert one_val_shard.val_loader.num_workers == 2


def test_overfit_batches_replays_the_first_batches_every_epoch(shapes_root) -> None:

    dm = WebDataModule(str(shapes_root / "train"), None, resolution=32, batch_size=16, num_workers=0,
                       overfit_batches=2)
    epochs = [[b["key"] for b in dm.train_dataloader()] for _ in range(2)]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]
    fresh = WebDataModule(str(shapes_root / "train"), None, resolution=32, batch_size=16, num_workers=0)
    fresh.setup("fit")
    first = next(iter(fresh.train_dataloader()))
    assert first["key"] == epochs[0][0] and "skips" not in next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="overfit_batches=99, but an epoch holds only 16 batches"):
        next(iter(WebDataModule(str(shapes_root / "train"), None, resolution=32, batch_size=16, num_workers=0,
                                overfit_batches=99).train_dataloader()))
