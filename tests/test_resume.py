"""Exact resume and preemption, through train.py in subprocesses: SIGKILL at a random step then `ckpt_path=last`
equals an uninterrupted run (same sample keys after the restart, equal final weights); SIGTERM and SIGUSR1 save
`last.ckpt` at the step they arrive; a kill during a checkpoint write leaves the previous file loadable. The runs
track a post-hoc EMA, whose snapshots must come out bit-identical too."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_train
from safetensors.torch import load_file

from ldm.utils.checkpoint_io import AtomicCheckpointIO

KEY_LOG = "+callbacks.sample_log._target_=ldm.callbacks.sample_log.SampleKeyLog"


@pytest.fixture(scope="module")
def parts(latent_parts: dict[str, Path]) -> dict[str, Path]:
    return latent_parts


def stage2(run_dir: Path, parts: dict[str, Path], steps: int) -> list[str]:
    """ldm_tiny on the latent cache: 8 shards x 32 = 16 batches per epoch, so 24 steps cross an epoch boundary."""
    return ["experiment=ldm_tiny", "data=latents", f"data.root={parts['latents']}",
            f"model.autoencoder.path={parts['export']}", f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}",
            "data.batch_size=16", f"trainer.max_steps={steps}", "trainer.val_check_interval=6",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "model.lr_scheduler.warmup_steps=3",
            "callbacks.model_checkpoint.every_n_train_steps=5", "~callbacks.sample_images", "logger=csv",
            "num_threads=1", KEY_LOG, "+callbacks=posthoc_ema", "callbacks.posthoc_ema.snapshot_every=4"]


def keys_by_step(run_dir: Path) -> dict[int, str]:
    """step -> keys, the last occurrence winning (a killed run's steps after its checkpoint are redone)."""
    lines = (run_dir / "keys_rank0.tsv").read_text().splitlines()
    return {int(step): keys for step, keys in (line.split("\t") for line in lines)}


def launch(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "print_config=false", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Block until the run has started training step `step` (its key line is written before the step)."""
    deadline = time.time() + timeout
    log = run_dir / "keys_rank0.tsv"
    while time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) > step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


STEPS = 24


@pytest.fixture(scope="module")
def straight(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps (a checkpoint every 5)."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_train(*stage2(run_dir, parts, STEPS))
    return run_dir


def assert_same_end(a_dir: Path, b_dir: Path, note: str) -> None:
    """Both runs end with equal weights and EMA (bit for bit) at STEPS."""
    a, b = checkpoint(a_dir / "checkpoints" / "last.ckpt"), checkpoint(b_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), f"{name} differs ({note})"
    ema_a, ema_b = (next(v for k, v in c["callbacks"].items() if k.startswith("EMA")) for c in (a, b))
    assert ema_a["num_updates"] == ema_b["num_updates"] == STEPS
    assert all(torch.equal(v, ema_b["state_dict"][k]) for k, v in ema_a["state_dict"].items())
    # the post-hoc EMA's snapshots (every 4 steps; those a killed run wrote past its checkpoint are rewritten)
    snaps_a, snaps_b = (sorted((d / "posthoc_ema").glob("*.safetensors")) for d in (a_dir, b_dir))
    assert [p.name for p in snaps_a] == [p.name for p in snaps_b] == [f"{s:09d}.safetensors" for s in range(4, 25, 4)]
    for pa, pb in zip(snaps_a, snaps_b):
        sa, sb = load_file(str(pa)), load_file(str(pb))
        assert sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items()), f"{pa.name} ({note})"


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(parts: dict[str, Path], straight: Path,
                                                         tmp_path: Path) -> None:
    steps = STEPS
    reference = keys_by_step(straight)
    assert sorted(reference) == list(range(steps))

    kill_at = random.Random().randint(7, 20)  # after at least one checkpoint (every 5 steps)
    interrupted = tmp_path / "interrupted"
    proc = launch(stage2(interrupted, parts, steps))
    wait_for_step(proc, interrupted, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = checkpoint(interrupted / "checkpoints" / "last.ckpt")["global_step"]
    assert 5 <= saved <= kill_at and saved % 5 == 0, (saved, kill_at)

    run_train(*stage2(interrupted, parts, steps), "ckpt_path=last")
    resumed = keys_by_step(interrupted)
    after = range(saved, steps)
    assert [resumed[s] for s in after] == [reference[s] for s in after], f"killed at {kill_at}, resumed at {saved}"

    assert_same_end(straight, interrupted, f"killed at {kill_at}, resumed at {saved}")


@pytest.mark.slow
def test_continuing_a_finished_run_to_more_steps_equals_one_run(parts: dict[str, Path], straight: Path,
                                                                tmp_path: Path) -> None:
    """A run that ended at max_steps=12 (mid-epoch, between periodic saves) and is continued to STEPS with
    `ckpt_path=last` finishes its epoch's data, not a new epoch's: its final save is written at the last batch,
    before Lightning counts the unfinished epoch as done."""
    run_dir = tmp_path / "run"
    run_train(*stage2(run_dir, parts, 12))
    saved = checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 12 and saved["epoch"] == 0
    run_train(*stage2(run_dir, parts, STEPS), "ckpt_path=last")
    reference, continued = keys_by_step(straight), keys_by_step(run_dir)
    assert [continued[s] for s in range(STEPS)] == [reference[s] for s in range(STEPS)]
    assert_same_end(straight, run_dir, "continued from step 12")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_last_checkpoint_at_that_step(parts: dict[str, Path], tmp_path: Path,
                                                             sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = launch(stage2(run_dir, parts, steps=1000))
    wait_for_step(proc, run_dir, 7)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    saved = checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    last_started = max(keys_by_step(run_dir))
    assert saved >= 7 and saved in (last_started, last_started + 1), (saved, last_started, out[-3000:])
    assert f"Received {sig.name}: saved" in out, out[-3000:]
    run_train(*stage2(run_dir, parts, steps=saved + 2), "ckpt_path=last")
    assert checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == saved + 2


class _ExplodingPickle:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated, half-way through the write)")


def test_atomic_checkpoint_io_keeps_the_previous_file_when_a_write_fails(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": _ExplodingPickle()}, path)
    assert checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # like any file written with open(), not mkstemp's 0600


WRITER = """
import sys, torch
from safetensors.torch import load_file

from ldm.utils.checkpoint_io import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), torch.randn(40_000_000)  # 160 MB: each save takes a while
for step in range(1000):
    io.save_checkpoint({"step": step, "w": big}, sys.argv[1])
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"  # one complete checkpoint exists
    time.sleep(random.Random().uniform(0.05, 0.5))  # then kill somewhere inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert checkpoint(path)["step"] >= 0


@pytest.mark.slow
def test_torchrun_ddp_cpu_ranks_see_disjoint_data_and_only_rank0_writes(parts: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 train.py ... trainer=ddp_cpu`: one run folder (no hydra.run.dir given), disjoint
    samples per rank in every epoch, checkpoints and logs written once."""
    overrides = [o for o in stage2(tmp_path / "unused", parts, steps=20) if not o.startswith("hydra.run.dir")]
    run_train(*overrides, "trainer=ddp_cpu", f"paths.log_dir={tmp_path}", nproc=2, timeout=900)
    runs = list((tmp_path / "ldm_tiny" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    run = runs[0]
    per_rank = [dict(line.split("\t") for line in (run / f"keys_rank{r}.tsv").read_text().splitlines())
                for r in (0, 1)]
    assert set(per_rank[0]) == set(per_rank[1]) == {str(s) for s in range(20)}
    for epoch_steps in (range(0, 8), range(8, 16)):  # 256 samples / (2 ranks x 16) = 8 steps per epoch
        seen = [{k for s in epoch_steps for k in keys[str(s)].split(",")} for keys in per_rank]
        assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 8 * 16
    assert checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 20
    assert [p.relative_to(run) for p in run.glob("**/metrics.csv")] == [Path("csv/metrics.csv")]
    assert len(list(run.glob("**/config_resolved.yaml"))) == 1


@pytest.mark.slow
def test_resuming_stage2_from_a_stage1_checkpoint_is_refused_by_name(parts: dict[str, Path], tmp_path: Path) -> None:
    stage1 = parts["export"].parent / "checkpoints" / "last.ckpt"
    proc = run_train(*stage2(tmp_path / "run", parts, steps=2), f"ckpt_path={stage1}", check=False)
    assert proc.returncode != 0
    assert "This is a 'autoencoder' checkpoint; stage 2 resumes only diffusion checkpoints" in proc.stderr
