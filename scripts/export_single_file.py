"""Entry point: `python scripts/export_single_file.py key=value ...` (or `ldm-export-single-file`); see ldm/cli/export_single_file.py."""

from ldm.cli.export_single_file import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
