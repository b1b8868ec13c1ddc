"""Shared fixtures: small built-in shards on disk, and a way to run `train.py` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
# The shard header-scan cache of this test session (and of the train.py processes it starts), not the user's.
os.environ.setdefault("LDM_SCAN_CACHE", tempfile.mkdtemp(prefix="ldm_scan_cache_"))
# One intra-op thread for the whole session, as the train.py processes below get (OMP_NUM_THREADS=1): two OpenMP
# threads on a shared 2-core machine spin against the other process; measured, four stage-1/stage-2/LoRA test files
# took 190-234 s with two threads and 36-70 s with one.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One intra-op thread for this test, whatever an earlier test set: two OpenMP threads on a shared 2-core machine
    spin against other processes and ran small-tensor tests 40-100x slower; one keeps them at seconds either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 train + 64 val built-in `shapes` images at 32 px in 8 + 2 shards."""
    from ldm.data.builtin import write_builtin

    root = tmp_path_factory.mktemp("shapes")
    write_builtin("shapes", root, num_samples=320, num_val=64, resolution=32, shard_size=32, seed=0)
    return root


class Lin(L.LightningModule):
    """The smallest LightningModule: one linear layer (`net`) trained by SGD on (B, 3) batches; for callback tests."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        return self.net(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_train(*overrides: str, cwd: Path = ROOT, timeout: float = 600, check: bool = True,
              env: dict[str, str] | None = None, nproc: int = 1) -> subprocess.CompletedProcess[str]:
    """`python train.py <overrides>` in a subprocess with offline W&B and one thread per process; with `nproc` > 1
    through `torchrun --standalone --nproc_per_node=<nproc>`."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "HYDRA_FULL_ERROR": "1", **(env or {})}
    flags = [o for o in overrides if o.startswith("-")]  # -m must precede the overrides
    args = [*flags, "print_config=false", *(o for o in overrides if not o.startswith("-"))]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / "train.py"), *args],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_overrides(run_dir: Path, shapes_root: Path, steps: int = 6) -> list[str]:
    """The quickstart autoencoder experiment, shrunk to a few steps on the session's shards."""
    return [
        "experiment=autoencoder_tiny", f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}",
        f"data.root={shapes_root}", "data.num_train=256", "data.num_val=64", "data.shard_size=32", "data.batch_size=16",
        "data.num_workers=0", f"trainer.max_steps={steps}", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.latent_stats.num_batches=2",
        "callbacks.model_checkpoint.every_n_train_steps=2", "model.loss.disc_start=3", "num_threads=1",
    ]


def cache_latents_cli(export: Path, source: Path, out: Path) -> None:
    """`scripts/cache_latents.py` in a subprocess, as a user runs it."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_latents.py"), f"autoencoder={export}",
                    f"source={source}", f"out={out}", "resolution=32", f"hydra.run.dir={out}/log"],
                   check=True, capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def stage2_runs(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> dict[str, Path]:
    """Tiny stage 1 (6 steps) -> latent cache -> tiny stage 2 (6 steps) through the entry points, with the sampling
    callback (every 4 steps) and the evaluation callback (random features, tiny CLIP) on, logging to W&B and CSV."""
    base = tmp_path_factory.mktemp("stage2")
    ae_dir, latents, ldm_dir = base / "autoencoder", base / "latents", base / "ldm"
    run_train(*tiny_overrides(ae_dir, shapes_root, steps=6), "logger=none")
    cache_latents_cli(ae_dir / "export", shapes_root, latents)
    run_train("experiment=ldm_tiny", "data=latents", f"data.root={latents}", f"model.autoencoder.path={ae_dir}/export",
              f"hydra.run.dir={ldm_dir}", f"paths.log_dir={base}", "data.batch_size=16", "trainer.max_steps=6",
              "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
              "model.lr_scheduler.warmup_steps=2", "num_threads=1", "logger=[wandb,csv]",
              "callbacks=[default,ema,sample_images,evaluate]",
              "callbacks.sample_images.every_n_steps=4", "callbacks.sample_images.images_per_prompt=2",
              "callbacks.sample_images.sampling.steps=3",
              f"callbacks.evaluate.shards={shapes_root}/val", "callbacks.evaluate.num_samples=8",
              "callbacks.evaluate.every_n_steps=4", "callbacks.evaluate.sampling.steps=2", "callbacks.evaluate.batch_size=4",
              "callbacks.evaluate.metrics=[fid,kid,clip_score]", "callbacks.evaluate.kid_subset_size=4",
              "callbacks.evaluate.kid_subsets=5", "~callbacks.evaluate.features",
              "+callbacks.evaluate.features={_target_:ldm.evaluation.features.RandomFeatures}",
              "callbacks.evaluate.clip_score.model_name=ldm-tiny-text", "callbacks.evaluate.clip_score.pretrained=null")
    return {"ae": ae_dir, "latents": latents, "ldm": ldm_dir, "ckpt": ldm_dir / "checkpoints" / "last.ckpt",
            "val": shapes_root / "val"}


@pytest.fixture(scope="session")
def latent_parts(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> dict[str, Path]:
    """A tiny stage-1 export (4 steps) and the latent cache of the session's shapes shards made with it."""
    from ldm.data.latent_cache import cache_latents
    from ldm.models.autoencoder.export import load_autoencoder

    base = tmp_path_factory.mktemp("latent_parts")
    run_train(*tiny_overrides(base / "ae", shapes_root, steps=4), "logger=none")
    export = base / "ae" / "export"
    for split in ("train", "val"):
        cache_latents(load_autoencoder(export), str(shapes_root / split), base / "latents" / split, resolution=32,
                      progress=False)
    return {"export": export, "latents": base / "latents", "shapes": shapes_root}


@pytest.fixture(scope="session")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision VGG16 `features` state dict, saved like the real LPIPS weights file."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path
