"""Make Lightning's DDP re-launch start *this* sweep job, not the whole Hydra multirun again.

Lightning starts ranks 1..N-1 by re-running `sys.argv` plus `hydra.run.dir=<HydraConfig.run.dir>`. Inside a
multirun, `sys.argv` holds `-m` and the sweep lists, so every extra rank would run the entire sweep into a
folder of its own (a known Lightning + Hydra trap). Here the command becomes this job's own overrides, and
the run dir this job's output dir, so each extra rank joins exactly its job.
"""

from __future__ import annotations

import os
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

# Read once at import: after the first job of a sweep, Lightning has put DDP variables into os.environ itself.
_LAUNCHED_EXTERNALLY = "LOCAL_RANK" in os.environ or "SLURM_NTASKS" in os.environ
_DDP_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_ORIGINAL_ENV = {name: os.environ.get(name) for name in _DDP_VARS}


def launched_externally() -> bool:
    """torchrun or SLURM started every rank already; Lightning will not re-launch anything."""
    return _LAUNCHED_EXTERNALLY


def end_distributed_job() -> None:
    """Leave the process as it was before this job, so the next job of a sweep launches its ranks afresh.

    Lightning's launcher writes LOCAL_RANK & co. into the parent's environment; left there, the next job would
    believe an external launcher started its ranks and wait forever for ranks nobody starts.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if not _LAUNCHED_EXTERNALLY:
        for name, value in _ORIGINAL_ENV.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pin_sweep_job_for_ddp() -> bool:
    """In a multirun job, rewrite what Lightning's launcher re-runs; returns whether anything changed."""
    if not HydraConfig.initialized() or launched_externally():
        return False
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    with open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    return True


def run_id() -> str:
    """One run-folder name for every process of a launch, for `hydra.run.dir`.

    Under srun or torchrun each rank composes its own config, and `${now:...}` can differ by a second between them,
    which would scatter one run over several folders. SLURM's job id (kept across requeues, so a requeued job finds
    its own `last.ckpt`) or torchrun's rendezvous (its agent's pid for `--standalone`) names the run instead; a plain
    launch gets the time, as Hydra's default does.
    """
    if "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ:
        return f"slurm-{slurm_job_id()}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        rdzv = os.environ["TORCHELASTIC_RUN_ID"]
        return f"torchrun-{rdzv if rdzv != 'none' else os.getppid()}"
    from datetime import datetime

    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def slurm_job_id() -> str:
    """This SLURM job's id as `scontrol` takes it: `<array job>_<task>` for an array task, else the job id."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if task else job
