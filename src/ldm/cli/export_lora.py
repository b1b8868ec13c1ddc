"""`python scripts/export_lora.py ckpt=PATH`: the LoRA adapter of a LoRA run (`model/lora=default`) as
`lora.safetensors` (the lora_A / lora_B tensors) and `lora.json` (rank, alpha, targets, the base backbone's config and weights hash); EMA weights by default. With
merge=true, a plain pipeline export with the adapter merged into the backbone instead (what export_pipeline.py writes).
With format=diffusers (UNet backbones), the adapter under diffusers' module names, for `pipe.load_lora_weights`.

    python scripts/export_lora.py ckpt=outputs/lora/checkpoints/last.ckpt out=outputs/lora/adapter
    python scripts/sample.py ckpt=<the base model> lora=outputs/lora/adapter lora_scale=1.0 prompt="..."
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ldm.utils.argv import KEY_VALUE_EPILOG, parse_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=KEY_VALUE_EPILOG.format(example="ckpt=PATH out=DIR merge=true"))
    parser.add_argument("--ckpt", required=True, help="a LoRA run's stage-2 .ckpt")
    parser.add_argument("--out", type=Path, default=None, help="default: <run folder>/lora (merge: .../pipeline)")
    parser.add_argument("--raw", action="store_true", help="the raw adapter weights instead of the EMA")
    parser.add_argument("--merge", action="store_true", help="write a pipeline export with the adapter merged in")
    parser.add_argument("--format", choices=("ldm", "diffusers"), default="ldm",
                        help="ldm: our adapter folder; diffusers: pytorch_lora_weights.safetensors (UNet only)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    run = Path(args.ckpt).resolve().parent.parent
    ema = False if args.raw else None
    if args.merge:
        from ldm.inference.loading import export_pipeline

        out = export_pipeline(args.ckpt, args.out or run / "pipeline", ema=ema)
        print(f"exported the merged model to {out}; sample with: python scripts/sample.py ckpt={out} prompt=\"...\"")
        return
    if args.format == "diffusers":
        from ldm.interop.diffusers_lora import export_diffusers_lora

        out = export_diffusers_lora(args.ckpt, args.out or run / "lora_diffusers", ema=ema)
        print(f"exported to {out}; in diffusers: pipe.load_lora_weights(\"{out}\")")
        return
    from ldm.inference.lora import export_lora

    out = export_lora(args.ckpt, args.out or run / "lora", ema=ema)
    print(f"exported to {out}; sample with: python scripts/sample.py ckpt=<base model> lora={out} prompt=\"...\"")


if __name__ == "__main__":
    main()
