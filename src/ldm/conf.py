"""Where the Hydra config tree lives (`ldm/configs`, shipped in the wheel; `conf/` in a clone links to it), and the resolvers its files use (`${ldm.run_id:}` in conf/hydra/default.yaml,
`${ldm.job_label:...}` and `${ldm.sweep_name:...}` in conf/logger/wandb.yaml).

Light on purpose (no Lightning, no torch), so that every command line can import it and start quickly.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ldm.utils.hydra_ddp import run_id
from ldm.utils.sweep import job_label, sweep_name

# Inside the package, so that a wheel install finds it from any directory; the repository's top-level `conf` is a link
# to it, so that `python train.py` and the docs' conf/... paths keep working in a clone.
CONF_DIR = str(Path(__file__).resolve().parent / "configs")
OmegaConf.register_new_resolver("ldm.run_id", run_id, use_cache=True, replace=True)
# conf/logger/wandb.yaml: a multirun job's W&B run name and group
OmegaConf.register_new_resolver("ldm.job_label", job_label, replace=True)
OmegaConf.register_new_resolver("ldm.sweep_name", sweep_name, replace=True)
