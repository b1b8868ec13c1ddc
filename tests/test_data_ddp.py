"""WebDataModule under a real 2-rank Lightning DDP run (CPU, gloo), launched as a subprocess script because
Lightning's DDP launcher re-executes the command line it was started with."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ldm.data.shards import Sample, write_shards
from ldm.data.webdataset import rank_batches

SHARD_SIZES = [7, 9, 8, 10, 6, 11, 5, 9, 8, 7]

SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning.pytorch as L
    import torch
    from ldm.data.datamodule import WebDataModule

    root, out = sys.argv[1], sys.argv[2]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.keys = []

        def training_step(self, batch, batch_idx):
            self.keys.extend(batch["key"])
            return (self.weight * batch["image"].mean()).sum()

        def on_train_epoch_end(self):
            path = f"{out}/rank{self.global_rank}_epoch{self.current_epoch}.json"
            with open(path, "w") as f:
                json.dump(self.keys, f)
            self.keys = []

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        dm = WebDataModule(root, None, resolution=8, batch_size=3, num_workers=2, seed=5)
        trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                            reload_dataloaders_every_n_epochs=1,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Probe(), datamodule=dm)
""")


@pytest.mark.slow
def test_ddp_two_ranks_get_disjoint_equal_epochs(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    for shard, size in enumerate(SHARD_SIZES):
        samples = [Sample(f"s{shard:02d}i{i:02d}", Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                          "x") for i in range(size)]
        write_shards(samples, shards, shard_size=100, image_format="png", prefix=f"{shard:03d}-")
    script = tmp_path / "ddp_probe.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(shards), str(out)], capture_output=True, text=True,
                            timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        keys = [json.loads((out / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        n = min(rank_batches(SHARD_SIZES, world_size=2, num_workers=2, batch_size=3, epoch=epoch, seed=5,
                             shuffle=True, split="sample"))  # 10 shards for 4 readers: samples are dealt (auto)
        assert len(keys[0]) == len(keys[1]) == 3 * n  # both ranks ran the same number of batches
        assert not set(keys[0]) & set(keys[1]) and all(len(k) == len(set(k)) for k in keys)
