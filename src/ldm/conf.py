"""Where the Hydra config tree lives, and the resolvers its files use (`${ldm.run_id:}` in conf/hydra/default.yaml).

Light on purpose (no Lightning, no torch), so that every command line can import it and start quickly.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ldm.utils.hydra_ddp import run_id

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
OmegaConf.register_new_resolver("ldm.run_id", run_id, use_cache=True, replace=True)
