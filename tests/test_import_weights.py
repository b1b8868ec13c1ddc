"""Released weights in (`ldm.interop.importing`, `scripts/import_weights.py`): a tiny random SD 2.x-like model saved
as a single file and as a diffusers folder is imported into our pipeline export, denoises exactly like the diffusers
model it came from, samples, and starts `experiment=sd2_finetune`; bad sources are refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
from tiny_sd import diffusers_unet, diffusers_vae, ours_autoencoder, ours_unet, text_encoder

from ldm.conf import CONF_DIR
from ldm.diffusion.parameterization import denoise
from ldm.inference.loading import backbone_weights, load_pipeline
from ldm.interop.importing import diffusers_unet_and_vae, from_diffusers, import_weights
from ldm.interop.single_file import export_single_file, load_single_file, single_file_state
from ldm.models.autoencoder.export import load_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="v_prediction")  # SD 2.x 768-v's scheduler_config.json (the entries that matter)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same random weights as a released single file (CompVis keys, no header of ours) and a diffusers folder."""
    root = tmp_path_factory.mktemp("release")
    unet, vae, text = diffusers_unet(), diffusers_vae(), text_encoder()
    save_file(single_file_state(ours_unet(unet), ours_autoencoder(vae), text), str(root / "sd2-tiny.safetensors"))
    folder = root / "sd2-tiny-diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDPMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    return {"unet": unet, "vae": vae, "text": text, "file": root / "sd2-tiny.safetensors", "folder": folder}


@pytest.fixture(scope="module")
def imported(release: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_weights(release["file"], tmp_path_factory.mktemp("imported") / "sd2-tiny", prediction="v",
                          resolution=32, head_channels=16)


def diffusers_x0(unet, x_ve: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """diffusers' x0 estimate of a v-prediction UNet at integer timestep t, from our VE-form x = x0 + sigma eps."""
    alpha_bar = DDPMScheduler(**SCHEDULER).alphas_cumprod[t]
    x_vp = x_ve * alpha_bar.sqrt()  # diffusers holds alpha x0 + sigma eps
    v = unet(x_vp, torch.tensor([t] * len(x_ve)), context).sample
    return alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * v


def test_the_import_denoises_like_the_diffusers_model(release: dict, imported: Path) -> None:
    pipeline = load_pipeline(imported)
    assert pipeline.default_size == 32 and pipeline.weights == "imported"
    context = pipeline.embed(["a red circle", "a blue square"]).tokens  # (2, 77, 64)
    g = torch.Generator().manual_seed(0)
    schedule = DDPMScheduler(**SCHEDULER)
    for t in (0, 250, 999):
        sigma = ((1 - schedule.alphas_cumprod[t]) / schedule.alphas_cumprod[t]).sqrt()
        x = torch.randn(2, 4, 8, 8, generator=g) * (1 + sigma**2).sqrt()
        with torch.no_grad():
            ours = denoise(pipeline.backbone, pipeline.process.parameterization, x, sigma.repeat(2), context)
            theirs = diffusers_x0(release["unet"], x, t, context)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():  # diffusers' pipelines decode `latents / scaling_factor`: so must ours, with SD's 0.18215
        expected = release["vae"].decode(z / 0.18215).sample.clamp(-1, 1)
        torch.testing.assert_close(pipeline.decode(z), expected, rtol=1e-4, atol=1e-4)


def test_the_autoencoder_card_carries_the_release_scale(imported: Path) -> None:
    card = json.loads((imported / "autoencoder" / "autoencoder.json").read_text())
    assert card["latent_scale"] == pytest.approx(0.18215) and card["latent_mean"] == [0.0] * 4
    assert card["latent_stats_source"].startswith("release: the released scale 0.18215 (SD), not measured")
    weights, which = backbone_weights(imported)  # what model.init_from reads
    assert which == "imported" and "conv_in.weight" in weights


def test_a_diffusers_folder_imports_the_same_unet_vae_and_process(release: dict, imported: Path) -> None:
    unet, vae, process, resolution = diffusers_unet_and_vae(release["folder"])
    assert resolution == 32 and process["parameterization"]["_target_"].endswith("VPrediction")
    assert process["schedule"]["beta_end"] == 0.012 and process["schedule"]["_target_"].endswith("ScaledLinearSchedule")
    from_file = load_pipeline(imported)
    for ours, theirs in ((unet, from_file.backbone), (vae, from_file.autoencoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/"):  # its text tower: the transformers format
        from_diffusers(release["folder"])


@pytest.mark.parametrize(("layers", "layer"), [(2, "last"), (1, "penultimate")])
def test_a_diffusers_text_encoder_conditions_as_in_diffusers(release: dict, tmp_path: Path, layers: int,
                                                              layer: str) -> None:
    """diffusers keeps the text tower as a transformers CLIPTextModel: imported, our encoder's token states are its
    last_hidden_state. With 2 blocks it is ldm-tiny-text read at its last layer; with 1 it is stored the way diffusers
    stores SD 2.x's ViT-H (one block short), and becomes ldm-tiny-text read at its penultimate layer."""
    from tiny_sd import randomize
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "full"
    folder.mkdir()
    for part in ("unet", "vae", "scheduler"):
        (folder / part).symlink_to(release["folder"] / part)
    clip = randomize(CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256,
                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                  hidden_act="gelu")), 3)
    clip.save_pretrained(folder / "text_encoder")
    encoder = load_pipeline(import_weights(folder, tmp_path / "out")).text_encoder
    assert encoder.layer == layer and encoder.model_name == "ldm-tiny-text"
    prompts = ["a red circle on a blue background", "", "two small squares, one above the other!"]
    with torch.no_grad():
        expected = clip(input_ids=encoder.tokenize(prompts)).last_hidden_state
        torch.testing.assert_close(encoder.encode(prompts).tokens, expected, rtol=1e-5, atol=1e-5)


def test_sample_py_samples_from_the_import(imported: Path, tmp_path: Path) -> None:
    from ldm.cli.sample import run

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"ckpt={imported}", "prompt=a red circle", "num_images=1", "steps=2",
                                           "sampler=ddim", f"out_dir={tmp_path}", "device=cpu"])
    assert [p.name for p in run(cfg)] == ["00000_a_red_circle_s0.png"]


def test_a_diffusers_vae_folder_is_an_autoencoder_path(release: dict) -> None:
    loaded = load_autoencoder(release["folder"] / "vae")
    assert float(loaded.latent_scale) == pytest.approx(0.18215)
    expected = ours_autoencoder(release["vae"]).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="describes a diffusers UNet2DConditionModel, not an AutoencoderKL"):
        load_autoencoder(release["folder"] / "unet")


def test_the_script_takes_key_value_arguments(release: dict, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import import_weights as script
    finally:
        sys.path.pop(0)
    script.main([f"source={release['file']}", f"out={tmp_path / 'out'}", "prediction=v", "resolution=32",
                 "head_channels=16"])
    assert "experiment=sd2_finetune" in capsys.readouterr().out
    assert (tmp_path / "out" / "pipeline.yaml").is_file() and (tmp_path / "out" / "text_encoder.safetensors").is_file()


# -------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------


def test_a_file_that_does_not_say_its_prediction_needs_the_argument(release: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not say whether its UNet predicts eps or v .* pass prediction=eps or "
                                         "prediction=v"):
        import_weights(release["file"], tmp_path / "out", head_channels=16)


def test_a_diffusers_folder_missing_a_part_names_it(release: dict, tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "unet").symlink_to(release["folder"] / "unet")
    (folder / "scheduler").symlink_to(release["folder"] / "scheduler")
    with pytest.raises(FileNotFoundError, match=r"lacks vae/ \(the AutoencoderKL\) .* it has \['scheduler', 'unet'\]"):
        import_weights(folder, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist: pass an SD 1.x/2.x single file"):
        import_weights(tmp_path / "nothing.safetensors", tmp_path / "out")
    with pytest.raises(ValueError, match="prediction=eps was asked for, but .*scheduler_config.json says v"):
        diffusers_unet_and_vae(release["folder"], prediction="eps")


def test_a_backbone_config_that_reads_the_weights_differently_is_refused(imported: Path) -> None:
    """Weights that fit by shape but not by function (the import has 32 GroupNorm groups, unet_tiny 8)."""
    import hydra

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=sd2_finetune", f"model.init_from={imported}",
                                          "model/backbone=unet_tiny", "model/text_encoder=tiny"])
    with pytest.raises(Exception, match=r"was trained as another UNet \(recorded -> this run\): norm_groups: 32 -> 8\. "
                                        r"The weights fit by shape .* set model.backbone.norm_groups=32"):
        hydra.utils.instantiate(cfg.model)


# -------------------------------------------------------------------------------------------------------
# Fine-tuning: experiment=sd2_finetune from the import, at toy size
# -------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~5 s
def test_sd2_finetune_trains_from_the_import_and_samples(imported: Path, shapes_root: Path, tmp_path: Path) -> None:
    from ldm.cli.sample import run
    from ldm.cli.train import train

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=sd2_finetune", f"model.init_from={imported}", f"paths.output_dir={tmp_path / 'run'}",
            # the import's toy sizes instead of SD 2.x's (for SD 2.x itself unet_sd2 and ViT-H-14 are already right)
            "model/backbone=unet_tiny", "model.backbone.norm_groups=32", "model/text_encoder=tiny",
            f"data.train_shards={shapes_root}/train", "data.resolution=32", "data.batch_size=4", "data.min_side=8",
            "data.num_workers=0", "trainer=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1", "model.lr_scheduler.warmup_steps=1", "callbacks=[default,ema]",
            "logger=csv", "num_threads=1", "model.optimizer.fused=false"])
    assert cfg.model.process.parameterization._target_.endswith("VPrediction")
    assert cfg.model.text_encoder.pretrained == f"{imported}/text_encoder.safetensors"
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    start, _ = backbone_weights(imported)
    raw = {k.removeprefix("backbone."): v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    assert raw.keys() == start.keys() and any(not torch.equal(raw[k], start[k]) for k in raw)
    assert max(float((raw[k] - start[k]).abs().max()) for k in raw) < 1e-3  # 3 AdamW steps at lr 1e-5 from it
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        sample_cfg = compose("sample", overrides=[f"ckpt={ckpt}", "prompt=a red circle", "num_images=1", "steps=2",
                                                  "sampler=ddim", f"out_dir={tmp_path / 'samples'}", "device=cpu"])
    assert len(run(sample_cfg)) == 1
    # and out again, for ComfyUI / A1111: the EMA weights in the single file, v from the run's process
    single = export_single_file(ckpt, tmp_path / "sd2-tiny-ft.safetensors")
    back = load_single_file(single)
    assert back.prediction == "v" and back.metadata["modelspec.resolution"] == "32x32"
    ema = load_pipeline(ckpt).backbone.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in back.backbone.state_dict().items())
