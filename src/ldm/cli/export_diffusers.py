"""Export a stage-2 checkpoint (or a pipeline export) as a diffusers folder: vae/, unet/ (or transformer/),
scheduler/, text_encoder/ + tokenizer/ and model_index.json, loadable with
`StableDiffusionPipeline.from_pretrained(out)`; what diffusers cannot represent is named in out/ldm_export.json.

    python scripts/export_diffusers.py ckpt=outputs/quickstart/ldm/checkpoints/last.ckpt out=outputs/quickstart/diffusers
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path

from ldm.interop.diffusers_export import NOTE, export_diffusers
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH out=DIR raw=true"))
    parser.add_argument("--ckpt", required=True, help="stage-2 .ckpt or pipeline export folder")
    parser.add_argument("--out", type=Path, default=None, help="default: <run folder>/diffusers (beside an export: "
                                                               "<export>_diffusers)")
    parser.add_argument("--raw", action="store_true", help="export the raw backbone weights instead of the EMA")
    parser.add_argument("--config", default=None, help="the run's resolved config, if not beside the checkpoint")
    parser.add_argument("--autoencoder", default=None, help="stage-1 export to use instead of the recorded one")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    ckpt = Path(args.ckpt)
    out = args.out or (ckpt.with_name(ckpt.name + "_diffusers") if ckpt.is_dir()
                       else ckpt.resolve().parent.parent / "diffusers")
    warnings.filterwarnings("ignore", message="diffusers export of")  # printed below, one line per part
    export = export_diffusers(ckpt, out, ema=False if args.raw else None, config=args.config,
                              autoencoder=args.autoencoder)
    print(f"exported {', '.join(export.written)} to {out}")
    if export.pipeline:
        print(f"load with: diffusers.{export.pipeline}.from_pretrained(\"{out}\")")
    for part, reason in export.missing.items():
        print(f"not written: {part}: {reason}")
    if export.missing:
        print(f"(recorded in {out / NOTE})")


if __name__ == "__main__":
    main()
