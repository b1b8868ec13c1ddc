"""Entry point: `python scripts/make_shards.py folder|table|builtin ...` (or `ldm-make-shards`); see ldm/cli/make_shards.py."""

from ldm.cli.make_shards import main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
