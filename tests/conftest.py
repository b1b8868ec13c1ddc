"""Shared fixtures: small built-in shards on disk, and a way to run `train.py` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


@pytest.fixture
def one_thread():
    """One intra-op thread: two OpenMP threads on a shared 2-core machine spin against other processes and ran
    small-tensor tests 40-100x slower; one keeps them at seconds either way."""
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


def run_train(*overrides: str, cwd: Path = ROOT, timeout: float = 600, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python train.py <overrides>` in a subprocess with offline W&B and one thread per process."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "HYDRA_FULL_ERROR": "1", **(env or {})}
    flags = [o for o in overrides if o.startswith("-")]  # -m must precede the overrides
    args = [*flags, "print_config=false", *(o for o in overrides if not o.startswith("-"))]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
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
