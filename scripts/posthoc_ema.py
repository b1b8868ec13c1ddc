"""Rebuild a post-hoc EMA from a run's snapshots: see ldm.cli.posthoc_ema."""

from ldm.cli.posthoc_ema import main

if __name__ == "__main__":
    main()
