"""Write a stage-2 checkpoint (EMA weights by default) or a pipeline export as one Stable Diffusion single file,
the CompVis-layout `.safetensors` that ComfyUI ("Load Checkpoint") and the A1111 web UI load:

    python scripts/export_single_file.py ckpt=outputs/sd2_finetune/runs/<time>/checkpoints/last.ckpt out=sd2-ft.safetensors

The model must be one those tools can run: a UNet with 32 norm groups, SD's scaled-linear process (eps or v), an
autoencoder with mid attention and SD's latent scale 0.18215 (models fine-tuned from imported SD weights are).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.interop.single_file import export_single_file
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH out=FILE raw=true"))
    parser.add_argument("--ckpt", required=True, help="stage-2 .ckpt or pipeline export folder")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--raw", action="store_true", help="the raw backbone weights instead of the EMA")
    parser.add_argument("--half", action="store_true", help="store fp16 tensors (half the size, as released files)")
    parser.add_argument("--allow-other-latent-scale", action="store_true",
                        help="write an autoencoder whose latent scale is not SD's 0.18215 (other tools will assume it)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    if args.out.suffix != ".safetensors":
        raise SystemExit(f"out={args.out}: the single file is written as .safetensors")
    out = export_single_file(args.ckpt, args.out, ema=False if args.raw else None,
                             latent_scale_check=not args.allow_other_latent_scale,
                             dtype=torch.float16 if args.half else None)
    print(f"wrote {out}: put it in ComfyUI's models/checkpoints or A1111's models/Stable-diffusion")


if __name__ == "__main__":
    main()
