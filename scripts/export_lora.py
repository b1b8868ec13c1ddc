"""Entry point: `python scripts/export_lora.py ckpt=PATH [out=DIR] [merge=true] [format=diffusers]` (see
ldm.cli.export_lora)."""

from ldm.cli.export_lora import main

if __name__ == "__main__":
    main()
