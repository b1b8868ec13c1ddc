"""Entry point: `python scripts/export_pipeline.py --ckpt PATH [--out DIR]` (or `ldm-export-pipeline`); see ldm/cli/export_pipeline.py."""

from ldm.cli.export_pipeline import build_parser, main  # noqa: F401

if __name__ == "__main__":
    main()
