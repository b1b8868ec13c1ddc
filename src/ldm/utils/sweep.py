"""What a job is within a Hydra multirun: its label (the overrides in which the jobs differ) and its sweep's name.

Registered as config resolvers (`conf/logger/wandb.yaml`) so that each W&B run of a sweep is named and grouped from
the config, in the job's own process: with the basic launcher every job runs in one process, with submitit each job
on its own node, and both see the sweep's `multirun.yaml`, which the launcher writes before it starts any job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MULTIRUN_FILE = "multirun.yaml"
# Overrides that say where a job writes or how it prints, never what it trains.
NOT_A_SETTING = ("hydra.", "paths.", "print_config=")


def _multirun() -> Any | None:
    """This job's Hydra config when it is a job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def _key(override: str) -> str:
    """`+a.b=1`, `~a.b`, `a/b=x` -> `a.b` / `a/b`: the config key or group an override sets."""
    return override.lstrip("~+").split("=", 1)[0]


def sweep_keys(task_overrides: list[str], sweeper_params: dict[str, Any] | None = None) -> set[str]:
    """The keys a sweep varies: command-line overrides with several values (`a=1,2`, `range(...)`, `choice(...)`)
    and the sweeper's `params` (an `hparams_search` config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys | {str(k) for k in (sweeper_params or {})}


def _sweep_dir(hydra_cfg: Any) -> Path | None:
    """The sweep folder above this job's folder: the one holding `multirun.yaml`."""
    return next((p for p in Path(hydra_cfg.runtime.output_dir).parents if (p / MULTIRUN_FILE).is_file()), None)


def job_label(default: str) -> str:
    """`diffusion/schedule=cosine seed=2`: this job's values of the keys its sweep varies; `default` outside a
    multirun (or when the sweep varies nothing, or its `multirun.yaml` cannot be found)."""
    hydra_cfg = _multirun()
    sweep_dir = _sweep_dir(hydra_cfg) if hydra_cfg is not None else None
    if sweep_dir is None:
        return default
    sweep = OmegaConf.load(sweep_dir / MULTIRUN_FILE).hydra
    params = sweep.sweeper.get("params")
    keys = sweep_keys(list(sweep.overrides.task), dict(params) if params else None)
    own = [str(o) for o in hydra_cfg.overrides.task if not str(o).startswith(NOT_A_SETTING)]
    return " ".join(o for o in own if _key(o) in keys) or default


def sweep_name(default: str) -> str:
    """`<default>/<sweep folder>` for the jobs of a multirun (their W&B group), else `default`."""
    hydra_cfg = _multirun()
    if hydra_cfg is None:
        return default
    return f"{default}/{(_sweep_dir(hydra_cfg) or Path(hydra_cfg.sweep.dir)).name}"
