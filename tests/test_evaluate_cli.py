"""scripts/evaluate.py at start-up, offline and in seconds: every missing weight file named in one error before any
data is read, the `preset=offline` smoke run, and the resolution a stage-1 export or checkpoint records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from ldm.cli import evaluate
from ldm.models.autoencoder.export import CARD, export_autoencoder, trained_resolution
from ldm.models.autoencoder.kl import PRESETS, AutoencoderKL
from ldm.utils import hub_weights
from ldm.utils.hub_weights import WeightsUnavailable

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:FID from .* rank-deficient")]


def evaluate_cfg(ckpt: Path, shards: Path | str, tmp_path: Path, *overrides: str):
    args = [f"ckpt={ckpt}", f"shards={shards}", "num_samples=8", "batch_size=4", "device=cpu", "wandb.enabled=false",
            f"out={tmp_path / 'metrics.json'}", *overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=args)


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights anywhere (empty torch hub and Hugging Face caches, no env vars), HF_HUB_OFFLINE=1, and probing
    the network fails the test."""
    for name in ("LDM_INCEPTION_WEIGHTS", "LDM_VGG16_WEIGHTS", "HF_HUB_CACHE", "HF_ENDPOINT", *hub_weights.OFFLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_weights, "hub_reachable", lambda *a, **k: pytest.fail("probed the network"))


@pytest.fixture
def offline(no_weights: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`no_weights`, and loading a checkpoint or reading data fails the test: the weights are checked first."""
    for name in ("load_pipeline", "load_autoencoder", "read_validation", "validation_batches"):
        monkeypatch.setattr(evaluate, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} before the weights"))


def fake_checkpoint(path: Path, stage: str) -> Path:
    """Just enough of a training checkpoint for `checkpoint_stage` and `trained_resolution`."""
    torch.save({"ldm": {"stage": stage}, "datamodule_hyper_parameters": {"resolution": 32}}, path)
    return path


# ------------------------------------------------------------------ every missing weight in one error


def test_offline_stage_2_names_inception_and_clip_in_one_error(tmp_path: Path, offline: None) -> None:
    ckpt = fake_checkpoint(tmp_path / "ldm.ckpt", "diffusion")
    with pytest.raises(WeightsUnavailable) as info:
        evaluate.run(evaluate_cfg(ckpt, tmp_path / "val", tmp_path))
    message = str(info.value)
    assert info.value.keys == ["features.weights", "clip.pretrained"]
    assert message.startswith("2 of the weights the chosen metrics need can be neither found nor downloaded")
    assert "1. fid, kid (local file: features.weights= or LDM_INCEPTION_WEIGHTS=): FID/KID need" in message
    assert "2. clip_score (local file: clip.pretrained=): OpenCLIP weights 'ViT-L-14' / 'openai'" in message
    assert "preset=offline" in message


def test_offline_stage_1_names_lpips_and_rfid_in_one_error(tmp_path: Path, offline: None) -> None:
    ckpt = fake_checkpoint(tmp_path / "ae.ckpt", "autoencoder")
    with pytest.raises(WeightsUnavailable) as info:
        evaluate.run(evaluate_cfg(ckpt, tmp_path / "val", tmp_path, "metrics=[lpips,rfid]"))
    message = str(info.value)
    assert info.value.keys == ["features.weights", "lpips_weights"]
    assert "1. rfid (local file: features.weights= or LDM_INCEPTION_WEIGHTS=): FID/KID need" in message
    assert "2. lpips (local file: lpips_weights= or LDM_VGG16_WEIGHTS=): LPIPS needs ImageNet VGG16" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_a_local_file_that_does_not_exist_is_listed_too(tmp_path: Path, offline: None) -> None:
    ckpt = fake_checkpoint(tmp_path / "ae.ckpt", "autoencoder")
    with pytest.raises(WeightsUnavailable) as info:
        evaluate.run(evaluate_cfg(ckpt, tmp_path / "val", tmp_path, f"lpips_weights={tmp_path / 'vgg16.pth'}"))
    assert isinstance(info.value, RuntimeError) and info.value.keys == ["features.weights", "lpips_weights"]
    assert f"VGG16 weights not found at '{tmp_path / 'vgg16.pth'}' (set by lpips_weights)" in str(info.value)


def test_weights_given_for_one_model_leave_only_the_other_in_the_error(tmp_path: Path, offline: None,
                                                                      vgg_file: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "ae.ckpt", "autoencoder")
    with pytest.raises(WeightsUnavailable, match=r"^1 of the weights") as info:
        evaluate.run(evaluate_cfg(ckpt, tmp_path / "val", tmp_path, f"lpips_weights={vgg_file}"))
    assert info.value.keys == ["features.weights"]


# ------------------------------------------------------------------ preset=offline


def test_preset_offline_picks_weight_free_models_and_skips_lpips(tmp_path: Path) -> None:
    cfg = evaluate_cfg(tmp_path / "x.ckpt", tmp_path, tmp_path, "preset=offline")
    assert cfg.features._target_.endswith("RandomFeatures") and cfg.clip.pretrained is None
    assert evaluate.select_metrics(cfg, "autoencoder") == ["psnr", "ssim", "rfid"]
    assert evaluate.select_metrics(cfg, "diffusion") == ["fid", "kid", "clip_score"]
    explicit = evaluate_cfg(tmp_path / "x.ckpt", tmp_path, tmp_path, "preset=offline", "metrics=[psnr,lpips]")
    assert evaluate.select_metrics(explicit, "autoencoder") == ["psnr", "lpips"]
    with pytest.raises(ValueError, match="skip_metrics=\\['lpip'\\] may only name"):
        evaluate.select_metrics(evaluate_cfg(tmp_path / "x.ckpt", tmp_path, tmp_path, "skip_metrics=[lpip]"),
                                "autoencoder")


# ------------------------------------------------------------------ stage 1: the resolution from the card


@pytest.fixture
def tiny_export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_autoencoder(AutoencoderKL(**PRESETS["tiny"]), tmp_path / "export", resolution=32)


def test_a_stage_1_export_evaluates_at_its_recorded_resolution(tiny_export: Path, shapes_root: Path,
                                                               tmp_path: Path, no_weights: None) -> None:
    assert json.loads((tiny_export / CARD).read_text())["resolution"] == 32 == trained_resolution(tiny_export)
    record = evaluate.run(evaluate_cfg(tiny_export, shapes_root / "val", tmp_path, "preset=offline"))
    assert record["resolution"] == 32 and set(record["results"][0]) == {"psnr", "ssim", "rfid"}
    assert json.loads((tmp_path / "metrics.json").read_text())["resolution"] == 32


def test_an_old_card_without_the_resolution_still_needs_resolution(tiny_export: Path, shapes_root: Path,
                                                                   tmp_path: Path, no_weights: None) -> None:
    card = json.loads((tiny_export / CARD).read_text())
    del card["resolution"]  # as written before the card recorded it
    (tiny_export / CARD).write_text(json.dumps(card))
    assert trained_resolution(tiny_export) is None
    with pytest.raises(ValueError, match="resolution= is required for a stage-1 checkpoint that does not record"):
        evaluate.run(evaluate_cfg(tiny_export, shapes_root / "val", tmp_path, "preset=offline"))
    record = evaluate.run(evaluate_cfg(tiny_export, shapes_root / "val", tmp_path, "preset=offline",
                                       "resolution=16", "metrics=[psnr]"))
    assert record["resolution"] == 16


def test_a_stage_1_checkpoint_knows_its_resolution_from_the_data_module(tmp_path: Path) -> None:
    assert trained_resolution(fake_checkpoint(tmp_path / "ae.ckpt", "autoencoder")) == 32
    torch.save({"ldm": {"stage": "autoencoder"}}, tmp_path / "old.ckpt")
    assert trained_resolution(tmp_path / "old.ckpt") is None
