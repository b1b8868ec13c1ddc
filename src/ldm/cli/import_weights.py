"""Import released Stable Diffusion 1.x/2.x weights as an ldm pipeline export: a single file (CompVis layout,
`.safetensors`, or a `.ckpt` read weights-only) or a diffusers folder (unet/, vae/, scheduler/, text_encoder/).

    python scripts/import_weights.py source=v2-1_768-ema-pruned.safetensors out=weights/sd21 prediction=v
    python scripts/sample.py ckpt=weights/sd21 prompt="a lighthouse at dusk"
    python train.py experiment=sd2_finetune model.init_from=weights/sd21 data.train_shards=/data/shards

The folder holds the UNet, the text tower and an autoencoder export carrying the release's latent scale (0.18215),
and the release's process (scaled-linear betas; eps or v).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ldm.interop.importing import import_weights
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="source=PATH out=DIR prediction=v"))
    parser.add_argument("--source", required=True, help="single file (.safetensors/.ckpt) or diffusers folder")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline export folder to write")
    parser.add_argument("--prediction", choices=["eps", "v"], default=None,
                        help="what the UNet predicts, where the source does not say (SD 2.x 768: v; 2.x-base, 1.x: eps)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="the image side it was trained at (default: from the source, else 512, 768 for 2.x v)")
    parser.add_argument("--num-heads", type=int, default=None, help="single files: attention heads per level "
                        "(default SD 1.x's 8), for UNets other than SD's")
    parser.add_argument("--head-channels", type=int, default=None, help="single files: channels per attention head "
                        "(default SD 2.x's 64)")
    parser.add_argument("--raw", action="store_true", help="single files with model_ema.* copies (unpruned training "
                        "checkpoints): the raw UNet instead of its EMA")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    heads: dict = {k: v for k, v in (("num_heads", args.num_heads), ("head_channels", args.head_channels)) if v is not None}
    if args.raw:
        heads["ema"] = False
    out = import_weights(args.source, args.out, prediction=args.prediction, resolution=args.resolution, **heads)
    print(f"imported to {out}; sample with: python scripts/sample.py ckpt={out} prompt=\"...\"; fine-tune with: "
          f"python train.py experiment=sd2_finetune model.init_from={out} data.train_shards=...")


if __name__ == "__main__":
    main()
