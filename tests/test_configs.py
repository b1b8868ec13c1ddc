"""Every experiment composes and instantiates; bad names and offline weights fail with clear messages."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytest
import torch
from conftest import CONF_DIR, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.cli.train import build
from ldm.cli.train import main as train_main

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def experiment_overrides(name: str, tmp_path: Path, shapes_root: Path, vgg_file: Path) -> list[str]:
    """Small data and no downloads; everything else exactly as the experiment says."""
    out = [f"experiment={name}", f"paths.output_dir={tmp_path}", "logger=csv"]
    cfg = compose_cfg(f"experiment={name}")
    if cfg.data._target_.endswith("BuiltinDataModule"):
        out += [f"data.root={shapes_root}", "data.num_train=256", "data.num_val=64", "data.shard_size=32",
                "data.resolution=32"]
    else:
        out += [f"data.train_shards={shapes_root}/train", f"data.val_shards={shapes_root}/val",
                "data.min_side=8", "data.num_workers=0", "data.batch_size=2"]
    if OmegaConf.select(cfg, "model.loss.perceptual") is not None:
        out.append(f"model.loss.perceptual.vgg_weights={vgg_file}")
    if cfg.model._target_.endswith("DiffusionModule"):
        out += [f"model.autoencoder.path={tiny_export(tmp_path, cfg.model.backbone.in_channels)}",
                "model.text_encoder.pretrained=null"]
    if OmegaConf.is_missing(cfg.model, "init_from") if "init_from" in cfg.model else False:
        out.append(f"model.init_from={backbone_export(tmp_path, cfg.model.backbone)}")
    return out


def backbone_export(tmp_path: Path, backbone_cfg) -> Path:
    """The smallest pipeline export `model.init_from` reads: its card and the backbone's (random) weights."""
    from safetensors.torch import save_file

    out = tmp_path / "init_from"
    out.mkdir()
    save_file(hydra.utils.instantiate(backbone_cfg).state_dict(), str(out / "backbone.safetensors"))
    (out / "pipeline.yaml").write_text("weights: random\n")
    return out


def tiny_export(tmp_path: Path, latent_channels: int = 4) -> Path:
    """A randomly initialised f4 autoencoder with latent statistics, exported as stage 1 would."""
    from ldm.models.autoencoder.export import export_autoencoder
    from ldm.models.autoencoder.kl import AutoencoderKL

    ae = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=latent_channels,
                       mid_attention=False, norm_groups=4)
    ae.set_latent_stats(0.5, torch.zeros(latent_channels), torch.ones(latent_channels))
    return export_autoencoder(ae, tmp_path / "ae_export")


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision VGG16 `features` state dict: the LPIPS loading path, offline."""
    from torchvision.models.vgg import cfgs, make_layers

    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save(make_layers(cfgs["D"]).state_dict(), path)  # vgg16().features, without initialising its classifier
    return path


@contextmanager
def unfilled_weights():
    """Random weight fills left out: at full size they are three quarters of a build's time on a 2-core CPU, and no
    assertion that builds under this reads a weight value (the init code itself still runs)."""
    with pytest.MonkeyPatch.context() as mp:
        for fill in ("uniform_", "normal_"):
            mp.setattr(torch.Tensor, fill, lambda self, *args, **kwargs: self)
        yield


def test_there_are_experiments() -> None:
    assert {"autoencoder_kl_f8", "autoencoder_tiny", "ldm_256", "ldm_tiny"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_instantiates(name: str, tmp_path: Path, shapes_root: Path, vgg_file: Path) -> None:
    cfg = compose_cfg(*experiment_overrides(name, tmp_path, shapes_root, vgg_file), "trainer.accelerator=cpu",
                      "trainer.precision=32-true", "trainer.devices=1", "trainer.strategy=auto")
    with unfilled_weights():
        built = build(cfg)
    assert isinstance(built.model, torch.nn.Module)
    assert built.trainer.max_steps == cfg.trainer.max_steps
    built.datamodule.prepare_data()
    built.datamodule.setup("fit")
    batch = next(iter(built.datamodule.train_dataloader()))
    assert batch["image"].shape[1:] == (3, cfg.data.resolution, cfg.data.resolution)  # square shapes: square bucket


def test_real_scale_autoencoder_geometry(tmp_path: Path, shapes_root: Path, vgg_file: Path) -> None:
    """experiment=autoencoder_kl_f8 builds SD's f8 c4 autoencoder (83.65M parameters) at 256 px."""
    cfg = compose_cfg(*experiment_overrides("autoencoder_kl_f8", tmp_path, shapes_root, vgg_file))
    assert cfg.data.resolution == 256 and cfg.trainer.accelerator == "gpu"
    with unfilled_weights():
        ae = hydra.utils.instantiate(cfg.model).autoencoder
    assert ae.downsample_factor == 8 and ae.latent_channels == 4
    assert abs(sum(p.numel() for p in ae.parameters()) - 83_653_863) < 10


def test_offline_lpips_fails_fast_with_the_config_key(tmp_path: Path, shapes_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    cfg = compose_cfg("experiment=autoencoder_kl_f8", f"paths.output_dir={tmp_path}", "logger=csv",
                      f"data.train_shards={shapes_root}/train")
    start = time.time()
    with pytest.raises(Exception, match="model.loss.perceptual.vgg_weights"):
        hydra.utils.instantiate(cfg.model)
    assert time.time() - start < 10


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu", "fsdp", "fsdp_cpu"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_trainer_and_logger_groups_compose(trainer: str, logger: str, tmp_path: Path) -> None:
    cfg = compose_cfg(f"trainer={trainer}", f"logger={logger}", f"paths.output_dir={tmp_path}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.use_distributed_sampler is False


def test_slurm_launcher_composes(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                                      f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 4


def train_cli_error(monkeypatch, capsys, *overrides: str) -> str:
    """`python train.py <overrides>` run in this process (the same Hydra entry point, without a 6 s interpreter
    start): it must exit with an error status; returns what it printed to stderr."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), *overrides])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # set, Hydra raises instead of reporting
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def test_unknown_config_name_lists_choices(monkeypatch, capsys) -> None:
    stderr = train_cli_error(monkeypatch, capsys, "model/autoencoder=kl_f9_c4")
    assert "kl_f9_c4" in stderr and "kl_f8_c4" in stderr and "kl_f4_c3" in stderr


def test_unknown_schedule_lists_choices(monkeypatch, capsys) -> None:
    stderr = train_cli_error(monkeypatch, capsys, "experiment=ldm_tiny", "diffusion/schedule=quadratic")
    assert "scaled_linear" in stderr and "rectified_flow" in stderr


def test_unknown_backbone_lists_choices() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)model/backbone/nope.*dit_tiny.*mmdit_base.*unet_tiny"):
        compose_cfg("experiment=ldm_tiny", "model/backbone=nope")


def test_unknown_experiment_lists_choices(monkeypatch, capsys) -> None:
    assert "autoencoder_tiny" in train_cli_error(monkeypatch, capsys, "experiment=nope")


def test_ldm_256_offline_text_weights_fail_fast(tmp_path: Path, shapes_root: Path, monkeypatch) -> None:
    """Without a local file for the ViT-H-14 weights, building stage 2 stops at once and says what to pass."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    cfg = compose_cfg("experiment=ldm_256", f"paths.output_dir={tmp_path}",
                      f"model.autoencoder.path={tiny_export(tmp_path)}")
    start = time.time()
    with pytest.raises(Exception, match="model.text_encoder.pretrained"):
        hydra.utils.instantiate(cfg.model)
    assert time.time() - start < 10


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_stage2_diffusion_groups_compose_into_the_process(schedule: str, parameterization: str,
                                                          tmp_path: Path) -> None:
    cfg = compose_cfg("experiment=ldm_tiny", f"paths.output_dir={tmp_path}", f"diffusion/schedule={schedule}",
                      f"diffusion/parameterization={parameterization}", "model.text_encoder.pretrained=null",
                      f"model.autoencoder.path={tiny_export(tmp_path, latent_channels=16)}")
    process = hydra.utils.instantiate(cfg.model.process)
    assert type(process.base_schedule).__name__.lower().startswith(schedule.replace("_", ""))
    assert type(process.parameterization).__name__.lower().startswith(parameterization)
    assert process.schedule(8, 8) is process.base_schedule  # no shift unless diffusion/shift says so
    loss = hydra.utils.instantiate(cfg.model.loss).bind(process.base_schedule, process.parameterization)
    assert loss.parameterization is process.parameterization


def test_stage1_configs_carry_no_diffusion_keys() -> None:
    assert "diffusion" not in compose_cfg("experiment=autoencoder_tiny")
    assert "diffusion" in compose_cfg("experiment=ldm_tiny")


def test_noise_schedule_sweep_preset_lists_the_grid(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ldm_tiny", "hparams_search=noise_schedules",
                                                      f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["diffusion/schedule"].split(",") == ["linear", "scaled_linear", "cosine", "sigmoid"]
    assert params["diffusion/parameterization"] == "eps,v"


@pytest.mark.parametrize("preset", ["fast", "smoke", "overfit", "profile"])
def test_debug_presets_report_at_the_end(preset: str, tmp_path: Path, shapes_root: Path, vgg_file: Path) -> None:
    """`debug=<preset>` on top of an experiment: every step logged, one validation at the very end, a few batches."""
    cfg = compose_cfg(*experiment_overrides("ldm_tiny", tmp_path, shapes_root, vgg_file), f"debug={preset}",
                      "logger=wandb" if preset != "smoke" else "logger=csv")
    built = build(cfg)
    trainer = built.trainer
    assert trainer.log_every_n_steps == 1 and trainer.max_steps < 1000
    assert trainer.val_check_interval == trainer.max_steps  # validation, checkpoint and samples at the end
    names = {type(c).__name__ for c in built.callbacks}
    assert "ModelCheckpoint" in names
    assert ("SampleImages" in names) == (preset != "overfit")
    if "SampleImages" in names:
        assert next(c for c in built.callbacks if type(c).__name__ == "SampleImages").every_n_steps == cfg.trainer.max_steps
    assert [type(lg).__name__ for lg in built.loggers] == (["CSVLogger"] if preset == "smoke" else ["WandbLogger"])
    if preset == "overfit":
        assert built.datamodule.overfit_batches == 1 and trainer.limit_val_batches == 0
    if preset == "profile":
        assert type(trainer.profiler).__name__ == "SimpleProfiler"
