"""Entry point: `python scripts/sample.py ckpt=PATH prompt="..."` (keys and defaults: conf/sample.yaml)."""

from ldm.cli.sample import main

if __name__ == "__main__":
    main()
