"""Entry point: `python scripts/export_diffusers.py key=value ...` (or `ldm-export-diffusers`); see ldm/cli/export_diffusers.py."""

from ldm.cli.export_diffusers import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
