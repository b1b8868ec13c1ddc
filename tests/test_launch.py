"""Launch plumbing: one run folder per srun/torchrun launch, `ckpt_path=auto` for requeued jobs, the sbatch recipe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from ldm.utils.checkpoint import resolve_ckpt_path
from ldm.utils.hydra_ddp import run_id


def test_run_id_is_shared_by_the_ranks_of_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert run_id()[:2] == "20"  # a plain launch: the time
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_id() == "torchrun-abc"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert run_id() == "slurm-123"  # kept across requeues, so the job finds its own last.ckpt
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_id() == "slurm-120_3"


def test_ckpt_path_auto_resumes_only_its_own_run(tmp_path: Path) -> None:
    own, other = tmp_path / "runs" / "slurm-1", tmp_path / "runs" / "slurm-0"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", own, tmp_path / "runs") is None  # first submission: fresh, not someone else's
    assert resolve_ckpt_path("last", own, tmp_path / "runs") == str(other / "checkpoints" / "last.ckpt")
    (own / "checkpoints").mkdir(parents=True)
    (own / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", own, tmp_path / "runs") == str(own / "checkpoints" / "last.ckpt")


def test_sbatch_recipe_is_valid_bash_and_resumes_itself() -> None:
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for needle in ("#SBATCH --signal=USR1@90", "#SBATCH --requeue", "srun", "trainer=ddp", "ckpt_path=auto",
                   'trainer.num_nodes="${SLURM_JOB_NUM_NODES}"'):
        assert needle in text, needle


def test_a_sweep_job_is_labelled_by_the_overrides_its_sweep_varies(tmp_path: Path) -> None:
    """The W&B name and group of a multirun job (conf/logger/wandb.yaml), from the sweep's multirun.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from ldm.utils.sweep import job_label, sweep_keys, sweep_name

    assert sweep_keys(["a=1", "b=1,2", "c=range(3)", "+d=choice(x,y)", "e=[1,2]"], {"f/g": "p,q"}) == {"b", "c", "d",
                                                                                                         "f/g"}
    assert job_label("ldm_tiny") == "ldm_tiny" and sweep_name("ldm_tiny") == "ldm_tiny"  # not a multirun
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    task = ["experiment=ldm_tiny", "seed=3", "diffusion/schedule=cosine", "model.optimizer.lr=1e-4",
            "hydra.sweep.dir=x", "print_config=false"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=task[:4], return_hydra_config=True)
    (sweep / "1").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {
        "overrides": {"task": ["experiment=ldm_tiny", "seed=1,2,3", "diffusion/schedule=linear,cosine",
                               "hydra.sweep.dir=x", "print_config=false"]},
        "sweeper": {"params": {"model.optimizer.lr": "1e-3,1e-4"}}}}), sweep / "multirun.yaml")
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(sweep / "1")
        cfg.hydra.overrides.task = task
    HydraConfig.instance().set_config(cfg)
    try:
        assert job_label("ldm_tiny") == "seed=3 diffusion/schedule=cosine model.optimizer.lr=1e-4"
        assert sweep_name("ldm_tiny") == "ldm_tiny/2026-01-01_00-00-00"
        (sweep / "multirun.yaml").unlink()  # not found: the task name rather than a guess
        assert job_label("ldm_tiny") == "ldm_tiny"
    finally:
        HydraConfig.instance().cfg = None
