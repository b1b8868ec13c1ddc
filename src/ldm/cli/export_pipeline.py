"""Export a stage-2 training checkpoint as a self-contained folder that `scripts/sample.py ckpt=<folder>` and
`scripts/evaluate.py` load: UNet weights (EMA by default), the text encoder when no pretrained file rebuilds it,
the autoencoder export and a `pipeline.yaml` with the parts' configs.

    python scripts/export_pipeline.py --ckpt outputs/quickstart/ldm/checkpoints/last.ckpt --out outputs/quickstart/pipeline
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ldm.inference.loading import export_pipeline
from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH out=DIR raw=true"))
    parser.add_argument("--ckpt", required=True, help="stage-2 .ckpt (its run's config_resolved.yaml is read)")
    parser.add_argument("--out", type=Path, default=None, help="default: <run folder>/pipeline")
    parser.add_argument("--raw", action="store_true", help="export the raw UNet weights instead of the EMA")
    parser.add_argument("--config", default=None, help="the run's resolved config, if not beside the checkpoint")
    parser.add_argument("--autoencoder", default=None, help="stage-1 export to use instead of the recorded one")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    out = args.out or Path(args.ckpt).resolve().parent.parent / "pipeline"
    export_pipeline(args.ckpt, out, ema=False if args.raw else None, config=args.config, autoencoder=args.autoencoder)
    print(f"exported to {out}; sample with: python scripts/sample.py ckpt={out} prompt=\"...\"")


if __name__ == "__main__":
    main()
