"""A non-editable install works from any directory (issue 14): the wheel ships the Hydra tree (`ldm/configs`) and the
console scripts, and a tiny stage 1 -> stage 2 -> sampling run goes through them in a folder that holds no
repository. The big dependencies are reused from this venv (a .pth line), so only the wheel is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the ldm wheel installed (no editable link to this checkout); returns its bin/ folder."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist"),
          str(source)], cwd=base)
    (wheel,) = (base / "dist").glob("ldm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ldm/configs/train.yaml" in names and "ldm/configs/experiment/ldm_tiny.yaml" in names
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=base)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=base).stdout.strip())
    (site / "reuse_project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch & co., not ldm
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=base)
    return venv / "bin"


def test_the_installed_package_trains_and_samples_from_another_directory(installed: Path, shapes_root: Path,
                                                                         tmp_path: Path) -> None:
    where = _run([str(installed / "python"), "-c", "import ldm.conf; print(ldm.conf.CONF_DIR)"], cwd=tmp_path)
    assert str(installed.parent) in where.stdout and "/src/" not in where.stdout  # the wheel's copy, not the checkout

    ae = tmp_path / "ae"
    _run([str(installed / "ldm-train"), *tiny_overrides(ae, shapes_root, steps=2), "logger=none",
          "print_config=false"], cwd=tmp_path)
    assert (ae / "export" / "autoencoder.safetensors").is_file()
    ldm = tmp_path / "ldm"
    _run([str(installed / "ldm-train"), "experiment=ldm_tiny", f"model.autoencoder.path={ae}/export",
          f"data.root={shapes_root}", f"hydra.run.dir={ldm}", f"paths.log_dir={tmp_path}", "data.batch_size=8",
          "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "logger=none",
          "callbacks=default", "num_threads=1", "print_config=false"], cwd=tmp_path)
    ckpt = ldm / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "samples"
    _run([str(installed / "ldm-sample"), f"ckpt={ckpt}", "prompt=a red circle", "num_images=1", "steps=2",
          f"out_dir={out}"], cwd=tmp_path)
    assert list(out.rglob("*.png"))
    assert not (tmp_path / "conf").exists()  # nothing came from (or was written as) a repository tree
