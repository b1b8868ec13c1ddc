"""Entry point: `python scripts/evaluate.py ckpt=PATH shards=VAL_SHARDS` (keys and defaults: conf/evaluate.yaml)."""

from ldm.cli.evaluate import main

if __name__ == "__main__":
    main()
