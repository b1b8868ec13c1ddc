"""Entry point: `python scripts/export_autoencoder.py --ckpt PATH --shards URLS --out DIR` (or `ldm-export-autoencoder`); see ldm/cli/export_autoencoder.py."""

from ldm.cli.export_autoencoder import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
