"""How the quickstart's stage 1 bounds prompt adherence: the shapes checker on autoencoder reconstructions.

Trains `experiment=autoencoder_tiny` through `train.py` once per variant (latent channels, steps, any override) and
scores the reconstructions of the 256 held-out images with the deterministic checker that scores the quickstart's
samples (`ldm.data.builtin.shapes_check`): whatever shape the checker cannot read back from a reconstruction, stage 2
cannot generate either, so this is the cheap way to choose the autoencoder before spending stage-2 minutes.

    python bench/quickstart_recipe.py                                   # latent channels 4, 8, 16 at 1200 steps
    python bench/quickstart_recipe.py --variant c8:model.autoencoder.latent_channels=8,trainer.max_steps=800

Prints a markdown table (also written to <out>/recipe.md): wall time, PSNR, and checker accuracy (colour, shape,
shape on small shapes) on the originals (the ceiling) and on each variant's reconstructions.
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
RESOLUTION = 32


def held_out(data: Path) -> tuple[torch.Tensor, list[str]]:
    """All held-out images of the built-in shapes shards (written on first use) with their captions."""
    from ldm.data.builtin import write_builtin
    from ldm.data.webdataset import ShardLoader

    write_builtin("shapes", data, num_samples=4352, num_val=256, resolution=RESOLUTION, seed=0, shard_size=256)
    loader = ShardLoader(str(data / "val"), resolution=RESOLUTION, batch_size=256, num_workers=0, mode="epoch",
                         crop="center", flip=False)
    batch = next(iter(loader))
    return batch["image"], list(batch["caption"])


def checker_row(images: torch.Tensor, captions: list[str]) -> tuple[float, float, float]:
    """(colour, shape, small-shape) accuracy of the shapes checker against the captions."""
    from ldm.data.builtin.shapes_check import score

    small = [i for i, c in enumerate(captions) if c.startswith("a small")]
    overall, smalls = score(images, captions), score(images[small], [captions[i] for i in small])
    return overall.accuracy("color"), overall.accuracy("shape"), smalls.accuracy("shape")


@torch.no_grad()
def reconstruct(export_dir: Path, images: torch.Tensor) -> torch.Tensor:
    from ldm.models.autoencoder.export import load_autoencoder

    autoencoder = load_autoencoder(export_dir).eval()
    return autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)


def train(name: str, overrides: list[str], out: Path) -> float:
    """Train one stage-1 variant through train.py (skipped when its export exists); return wall seconds."""
    run_dir = out / name
    marker = run_dir / "wall_s"
    if marker.exists():
        return float(marker.read_text())
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=autoencoder_tiny", f"hydra.run.dir={run_dir}",
           "print_config=false", "logger=csv", *overrides]
    print("[recipe]", " ".join(cmd[2:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.time() - start
    marker.write_text(f"{wall:.1f}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=None,
                        help="name:override,override,... (default: latent channels 4, 8 and 16)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quickstart_recipe")
    args = parser.parse_args()
    variants = args.variant or [f"c{c}:model.autoencoder.latent_channels={c}" for c in (4, 8, 16)]
    args.out.mkdir(parents=True, exist_ok=True)
    images, captions = held_out(ROOT / "data" / f"shapes_{RESOLUTION}")
    colour, shape, small = checker_row(images, captions)
    rows = ["| variant | overrides | train wall s | PSNR dB | colour | shape | small-shape |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| originals | | | inf | {100 * colour:.1f}% | {100 * shape:.1f}% | {100 * small:.1f}% |"]
    print(rows[-1], flush=True)
    for variant in variants:
        name, _, spec = variant.partition(":")
        overrides = [o for o in spec.split(",") if o]
        wall = train(name, overrides, args.out)
        recon = reconstruct(args.out / name / "export", images)
        psnr = float(10 * torch.log10(1 / ((recon - images) / 2).square().mean()))
        colour, shape, small = checker_row(recon, captions)
        rows.append(f"| {name} | {' '.join(overrides)} | {wall:.0f} | {psnr:.2f} | {100 * colour:.1f}% | "
                    f"{100 * shape:.1f}% | {100 * small:.1f}% |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    (args.out / "recipe.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
