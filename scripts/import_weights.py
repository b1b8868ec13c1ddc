"""Entry point: `python scripts/import_weights.py key=value ...` (or `ldm-import-weights`); see ldm/cli/import_weights.py."""

from ldm.cli.import_weights import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
