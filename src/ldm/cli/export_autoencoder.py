"""Measure latent statistics for any stage-1 checkpoint and export the autoencoder for stage 2.

    python scripts/export_autoencoder.py --ckpt outputs/.../checkpoints/last.ckpt \
        --shards '/data/laion/{00000..00099}.tar' --resolution 256 --out outputs/.../export
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.callbacks.latent_stats import measure_latents
from ldm.data.webdataset import ShardLoader
from ldm.models.autoencoder.export import export_autoencoder, load_autoencoder, trained_resolution
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH shards=DIR resolution=256 "
                                                                            "batch_size=32"))
    parser.add_argument("--ckpt", required=True, help="stage-1 .ckpt, or an export folder to re-measure")
    parser.add_argument("--shards", required=True, help="shards to measure on (folder, brace pattern, URL)")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-batches", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--mode", choices=["sample", "mean"], default="sample",
                        help="measure posterior samples (SD's convention) or posterior means")
    parser.add_argument("--out", type=Path, default=None, help="default: <ckpt folder>/../export")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    autoencoder = load_autoencoder(args.ckpt).to(args.device)
    loader = ShardLoader(args.shards, batch_size=args.batch_size, resolution=args.resolution,
                         num_workers=args.num_workers, mode="epoch", crop="center", flip=False)
    stats = measure_latents(autoencoder, loader, args.num_batches, torch.device(args.device),
                            sample_posterior=args.mode == "sample")
    scale, mean, std = stats.finalize()
    autoencoder.set_latent_stats(scale, mean, std)
    out = args.out or Path(args.ckpt).resolve().parent.parent / "export"
    export_autoencoder(autoencoder.cpu(), out, resolution=trained_resolution(args.ckpt),
                       source_checkpoint=str(args.ckpt))
    print(f"latent scale {scale:.5f}, mean {mean.tolist()}, std {std.tolist()} over {int(stats.count)} positions")
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
