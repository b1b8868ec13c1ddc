"""Entry point: `python scripts/cache_latents.py autoencoder=... source=... out=... resolution=...`
(keys: conf/cache_latents.yaml)."""

from ldm.cli.cache_latents import main

if __name__ == "__main__":
    main()
