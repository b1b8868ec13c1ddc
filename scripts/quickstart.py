"""`make quickstart`: the whole framework on a laptop CPU, on built-in data, through the real entry points.

1. trains the tiny autoencoder on the built-in `shapes` shards through `train.py` (the shards are written
   on first use), which also measures the latent statistics and exports the autoencoder;
2. reconstructs held-out validation images with the exported autoencoder, writes a grid, prints PSNR.
Re-running skips a finished stage (pass --force to retrain).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_stage(name: str, overrides: list[str], out_dir: Path, done_marker: Path, force: bool) -> None:
    if done_marker.exists() and not force:
        print(f"[quickstart] {name}: already done ({done_marker}); --force retrains")
        return
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={out_dir}", "print_config=false"]
    print(f"[quickstart] {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


@torch.no_grad()
def reconstruction_grid(export_dir: Path, shards: Path, out_png: Path, resolution: int, n: int = 16) -> float:
    """Reconstruct `n` validation images; write input/reconstruction rows; return PSNR in dB."""
    from ldm.data.webdataset import ShardLoader
    from ldm.models.autoencoder.export import load_autoencoder
    from ldm.utils.images import image_grid

    autoencoder = load_autoencoder(export_dir).eval()
    loader = ShardLoader(str(shards), resolution=resolution, batch_size=n, num_workers=0, mode="epoch",
                         crop="center", flip=False)
    x = next(iter(loader))["image"]
    recon = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
    image_grid(torch.cat([x, recon]), nrow=n).save(out_png)
    mse = ((recon - x) / 2).square().mean()
    return float(10 * torch.log10(1 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "quickstart")
    parser.add_argument("--force", action="store_true", help="retrain stages that already finished")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    ae_dir = args.out / "autoencoder"
    run_stage("stage 1 (autoencoder)", ["experiment=autoencoder_tiny"], ae_dir,
              ae_dir / "export" / "autoencoder.json", args.force)
    resolution = 32
    psnr = reconstruction_grid(ae_dir / "export", ROOT / "data" / f"shapes_{resolution}" / "val",
                               args.out / "reconstructions.png", resolution)
    print(f"\n[quickstart] done in {(time.time() - start) / 60:.1f} min")
    print(f"  reconstructions (top: input, bottom: output): {args.out / 'reconstructions.png'}  PSNR {psnr:.2f} dB")
    print(f"  autoencoder checkpoints: {ae_dir / 'checkpoints'}   export for stage 2: {ae_dir / 'export'}")
    print(f"  W&B offline run: {next(iter(sorted((ae_dir / 'wandb').glob('offline-run-*'))), ae_dir / 'wandb')}"
          "  (upload with `wandb sync <dir>`)")


if __name__ == "__main__":
    main()
