"""Entry point: `python train.py experiment=<name> [overrides]` (see README.md)."""

from ldm.cli.train import main

if __name__ == "__main__":
    main()
