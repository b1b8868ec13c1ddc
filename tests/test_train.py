"""Stage 1 end to end through `train.py`: loss falls, W&B offline, checkpoints, resume, export, DDP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_train, tiny_overrides

pytestmark = pytest.mark.slow


def read_metric(run_dir: Path, key: str) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ae"
    run_train(*tiny_overrides(run_dir, shapes_root, steps=40), "logger=[wandb,csv]",
              "model.loss.disc_start=30", "model.lr_scheduler.warmup_steps=5")
    return run_dir


def test_loss_falls(trained: Path) -> None:
    rec = read_metric(trained, "train/rec")
    first, last = sum(v for _, v in rec[:10]) / 10, sum(v for _, v in rec[-10:]) / 10
    assert len(rec) == 40 and last < 0.85 * first, (first, last)  # measured: 0.62 -> 0.45


def test_gan_stage_logs_both_losses(trained: Path) -> None:
    d_steps = [s for s, _ in read_metric(trained, "train/d")]
    assert d_steps and min(d_steps) >= 30  # the discriminator starts at disc_start, not before
    assert read_metric(trained, "train/d_weight")


def test_outputs_resolved_config_checkpoint_and_export(trained: Path) -> None:
    assert (trained / "config_resolved.yaml").is_file() and (trained / ".hydra" / "config.yaml").is_file()
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 40
    assert len(ckpt["optimizer_states"]) == 2  # generator and discriminator
    assert ckpt["ldm"]["autoencoder"]["latent_channels"] == 16  # experiment=autoencoder_tiny
    card = json.loads((trained / "export" / "autoencoder.json").read_text())
    assert card["latent_stats_set"] and card["downsample_factor"] == 4 and card["latent_channels"] == 16
    assert 0.0 < card["latent_scale"] < 100.0
    assert torch.allclose(ckpt["state_dict"]["autoencoder.latent_std"], torch.tensor(card["latent_std"]))
    assert list((trained / "images").glob("val_reconstructions_*.png"))


def test_wandb_offline_run_has_scalars_and_images(trained: Path) -> None:
    runs = list((trained / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("run-*.wandb"))
    data = wandb_file.read_bytes()
    assert b"train/rec" in data and b"val/reconstructions" in data
    assert list(runs[0].glob("files/media/images/**/*.png"))


def test_wandb_step_axis_never_goes_backwards_and_the_run_folder_names_its_run(trained: Path) -> None:
    from ldm.cli.sweep_report import wandb_history

    run = next((trained / "wandb").glob("offline-run-*"))
    rows = wandb_history(next(run.glob("run-*.wandb")))
    steps = [r["trainer/global_step"] for r in rows if "trainer/global_step" in r]
    assert steps == sorted(steps) and steps[-1] >= 39, steps  # data/*, images and train/* share one axis
    assert any("data/skipped_corrupt_image" in r for r in rows) and any("train/lr" in r for r in rows)
    pointer = json.loads((trained / "wandb_run.json").read_text())
    assert pointer["dir"] == str(run) and run.name.endswith(pointer["id"]) and pointer["offline"]
    assert pointer["name"] == "autoencoder_tiny" and pointer["group"] == "autoencoder_tiny"  # not a sweep


def test_hyperparameters_are_the_config_once(trained: Path) -> None:
    import yaml

    hparams = yaml.safe_load((trained / "csv" / "hparams.yaml").read_text())  # what every logger received
    assert hparams["data"]["batch_size"] == 16 and "model" in hparams and "trainer" in hparams
    assert not {"batch_size", "resolution", "train_shards", "num_workers"} & set(hparams)  # no datamodule copy


def test_resume_continues_from_the_saved_step(trained: Path, tmp_path: Path, shapes_root: Path) -> None:
    import shutil

    run_dir = tmp_path / "resumed"
    shutil.copytree(trained, run_dir)
    proc = run_train(*tiny_overrides(run_dir, shapes_root, steps=46), "logger=csv", "ckpt_path=last",
                     "model.loss.disc_start=30")
    assert "Restored all states" in proc.stdout + proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 46
    before = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the Adam moments continued (step count advanced), rather than restarting from zero
    step_of = lambda c: next(iter(c["optimizer_states"][0]["state"].values()))["step"]  # noqa: E731
    assert float(step_of(ckpt)) == float(step_of(before)) + 6


def test_resume_refuses_another_architecture(trained: Path, tmp_path: Path, shapes_root: Path) -> None:
    proc = run_train(*tiny_overrides(tmp_path / "other", shapes_root, steps=46), "logger=none",
                     f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "model.autoencoder.latent_channels=3",
                     check=False)
    assert proc.returncode != 0
    assert "latent_channels: 16 -> 3" in proc.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, shapes_root: Path) -> None:
    proc = run_train(*tiny_overrides(tmp_path / "fresh", shapes_root), "logger=none", "ckpt_path=last",
                     f"paths.log_dir={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode != 0 and "no checkpoints/last.ckpt" in proc.stderr


def test_ddp_cpu_two_processes(tmp_path: Path, shapes_root: Path) -> None:
    run_dir = tmp_path / "ddp"
    proc = run_train(*tiny_overrides(run_dir, shapes_root, steps=4), "trainer=ddp_cpu", "logger=csv",
                     timeout=900)
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert (run_dir / "export" / "autoencoder.json").is_file()
    assert not list(tmp_path.glob("**/multirun*"))  # the second rank did not start a run of its own


@pytest.mark.parametrize("experiment", ["ldm_tiny", "dit_tiny", "mmdit_tiny"])
def test_stage2_trains_on_the_stage1_export(experiment: str, trained: Path, tmp_path: Path, shapes_root: Path) -> None:
    """experiment=ldm_tiny (UNet, v), dit_tiny and mmdit_tiny (transformers, rectified flow) on the autoencoder
    exported above: the denoising loss falls, EMA is saved, the end-of-training samples are finite."""
    run_dir = tmp_path / "ldm"
    run_train(f"experiment={experiment}", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}", "logger=csv",
              f"model.autoencoder.path={trained / 'export'}", f"data.root={shapes_root}", "data.num_train=256",
              "data.num_val=64", "data.shard_size=32", "data.batch_size=32", "data.num_workers=0",
              "trainer.max_steps=100", "trainer.val_check_interval=50", "trainer.limit_val_batches=1",
              "trainer.log_every_n_steps=1", "model.lr_scheduler.warmup_steps=5", "num_threads=1")
    loss = read_metric(run_dir, "train/loss")
    first, last = sum(v for _, v in loss[:20]) / 20, sum(v for _, v in loss[-20:]) / 20
    # ldm_tiny (v, min-SNR) falls more slowly on the 16-channel latents of this 40-step autoencoder: measured 0.276 ->
    # 0.234 (0.85); without learning the two 20-step means differ by a few percent
    assert len(loss) == 100 and last < (0.9 if experiment == "ldm_tiny" else 0.8) * first, (first, last)
    assert read_metric(run_dir, "val/x0_mse_logsnr_+0")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ldm"]["stage"] == "diffusion" and ckpt["global_step"] == 100
    assert not any(k.startswith("autoencoder.") for k in ckpt["state_dict"])
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert ema["num_updates"] == 100 and set(ema["state_dict"]) == {
        k.removeprefix("backbone.") for k in ckpt["state_dict"] if k.startswith("backbone.")}
    assert ckpt["ldm"]["backbone"]["_target_"].rsplit(".", 1)[1].lower() == experiment.split("_")[0].replace("ldm",
                                                                                                          "unet")
    assert list((run_dir / "images").glob("samples_*.png"))  # the sampling callback ran at the end


def test_multirun_with_ddp_runs_each_job_once(tmp_path: Path, shapes_root: Path) -> None:
    """`-m` + trainer=ddp_cpu: two jobs, two folders; the second rank joins its job instead of re-sweeping."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tmp_path / "unused", shapes_root, steps=2)
                 if not o.startswith(("hydra.run.dir", "callbacks.latent_stats"))]
    proc = run_train("-m", *overrides, "trainer=ddp_cpu", "logger=csv", "model.loss.kl_weight=1e-6,1e-5",
                     f"hydra.sweep.dir={sweep}", "callbacks.latent_stats.num_batches=1", timeout=900)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != ".hydra")
    assert jobs == ["0", "1"], (jobs, proc.stdout[-2000:])
    for job in jobs:
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2
    assert (sweep / "1" / ".hydra" / "overrides.yaml").read_text().count("kl_weight=1e-05") == 1
    assert not (tmp_path / "autoencoder_tiny").exists() and not (tmp_path / "unused").exists()


def test_stage2_ddp_cpu_two_processes(trained: Path, tmp_path: Path, shapes_root: Path) -> None:
    run_dir = tmp_path / "ldm_ddp"
    proc = run_train("experiment=ldm_tiny", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}", "logger=csv",
                     "trainer=ddp_cpu", f"model.autoencoder.path={trained / 'export'}", f"data.root={shapes_root}",
                     "data.num_train=256", "data.num_val=64", "data.shard_size=32", "data.batch_size=16",
                     "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
                     "trainer.limit_val_batches=1", "num_threads=1", timeout=900)
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["ldm"]["stage"] == "diffusion"


def test_a_shifted_flow_checkpoint_samples_on_its_training_ladder(trained: Path, tmp_path: Path,
                                                                  shapes_root: Path) -> None:
    """Flux's resolution-dependent shift: the pipeline loaded from the checkpoint uses, at the training latent size,
    exactly the schedule (and so the sigma ladder) that training drew its noise levels from."""
    import hydra
    from omegaconf import OmegaConf

    from ldm.diffusion.spacing import sampling_sigmas
    from ldm.inference.loading import load_pipeline

    run_dir = tmp_path / "dit"
    run_train("experiment=dit_tiny", "diffusion/shift=flux", f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}",
              "logger=none", f"model.autoencoder.path={trained / 'export'}", f"data.root={shapes_root}",
              "data.num_train=256", "data.num_val=64", "data.shard_size=32", "data.batch_size=16",
              "data.num_workers=0", "trainer.max_steps=2", "trainer.limit_val_batches=0", "num_threads=1",
              "~callbacks.sample_images")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["ldm"]["process"]["shift"]["shift"] is None  # dynamic (Flux)
    trained_process = hydra.utils.instantiate(OmegaConf.load(run_dir / "config_resolved.yaml").model.process)
    pipeline = load_pipeline(run_dir / "checkpoints" / "last.ckpt")
    assert pipeline.process.describe() == ckpt["ldm"]["process"] == trained_process.describe()
    latent = (8, 8)  # 32 px / f4: 16 tokens of 2x2 latent cells
    t = torch.linspace(0.05, 0.95, 7)
    train_schedule = trained_process.schedule(*latent)
    assert (train_schedule.logsnr(t) - trained_process.base_schedule.logsnr(t)).abs().min() > 0.1  # a real shift
    torch.testing.assert_close(pipeline.process.schedule(*latent).logsnr(t), train_schedule.logsnr(t))
    for spacing in ("auto", "linspace"):
        torch.testing.assert_close(pipeline.sigmas(10, spacing, latent), sampling_sigmas(train_schedule, 10, spacing))
    assert bool(pipeline.generate(["a red circle"], [0], steps=4).finite.all())
