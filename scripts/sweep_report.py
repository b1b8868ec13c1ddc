"""Entry point: `python scripts/sweep_report.py outputs/<task>/multiruns/<time>` (options: --help)."""

from ldm.cli.sweep_report import main

if __name__ == "__main__":
    main()
