"""Export to diffusers: a tiny random stage-2 model, exported, loads in diffusers' own classes (offline) and gives
the same images as our pipeline for the same prompt, seed and sampler, and the same network output at every step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.inference.loading import load_pipeline
from ldm.interop.diffusers_export import NOTE, export_diffusers
from ldm.models.autoencoder.export import export_autoencoder, weights_hash
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.backbone import Conditioning
from ldm.models.dit import DiT
from ldm.models.mmdit import MMDiT
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a small red circle on a blue background"
SCHEDULES = {  # conf/diffusion/schedule/*.yaml
    "scaled_linear": {"_target_": "ldm.diffusion.schedules.ScaledLinearSchedule", "num_timesteps": 1000,
                      "beta_start": 0.00085, "beta_end": 0.012, "zero_terminal_snr": False},
    "scaled_linear_zero_snr": {"_target_": "ldm.diffusion.schedules.ScaledLinearSchedule", "num_timesteps": 1000,
                               "beta_start": 0.00085, "beta_end": 0.012, "zero_terminal_snr": True},
    "sigmoid": {"_target_": "ldm.diffusion.schedules.SigmoidSchedule", "num_timesteps": 1000},
    "karras": {"_target_": "ldm.diffusion.schedules.KarrasSchedule"},
    "rectified_flow": {"_target_": "ldm.diffusion.schedules.RectifiedFlow"},
}
PARAMETERIZATIONS = {"v": "ldm.diffusion.parameterization.VPrediction",
                     "eps": "ldm.diffusion.parameterization.EpsPrediction",
                     "flow": "ldm.diffusion.parameterization.FlowPrediction"}


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.ndim > 1 else 0.1))


def make_export(folder: Path, *, schedule: str = "scaled_linear", parameterization: str = "v",
                backbone: str = "unet", latent_norm: str = "scale") -> Path:
    """Our pipeline export (pipeline.yaml + backbone/text encoder safetensors + autoencoder/) of random tiny parts."""
    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                       mid_attention=True, norm_groups=4, latent_norm=latent_norm)
    _randomize(ae, 0.5, 1)  # contrast: pixel std ~0.15 in [0, 1] (0.06 at 0.15)
    if latent_norm == "scale":
        ae.set_latent_stats(scale=0.7)
    else:
        ae.set_latent_stats(scale=1.0, mean=[0.1, 0.0, -0.1, 0.2], std=[0.5, 1.0, 1.5, 2.0])
    export_autoencoder(ae, folder / "autoencoder", resolution=32)
    if backbone == "unet":
        net: torch.nn.Module = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                                    num_heads=None, head_channels=8, context_dim=64, norm_groups=4)
        _randomize(net, 0.05, 2)
    elif backbone == "dit":
        net = DiT(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, patch_size=2, context_dim=64,
                  sample_size=8, interpolation_scale=1.0)
        _randomize(net, 0.05, 2)
    else:
        net = MMDiT(in_channels=4, out_channels=4, hidden_size=32, depth=2, num_heads=2, patch_size=2, context_dim=64,
                    pooled_dim=64, qk_norm="rms_norm", sample_size=8, pos_embed_max_size=None)
        _randomize(net, 0.05, 2)
    text = OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "backbone.safetensors"))
    save_file({k: v.contiguous() for k, v in text.state_dict().items()}, str(folder / "text_encoder.safetensors"))
    target = {"unet": "ldm.models.unet.unet.UNet", "dit": "ldm.models.dit.DiT", "mmdit": "ldm.models.mmdit.MMDiT"}[backbone]
    param = {"_target_": PARAMETERIZATIONS[parameterization]}
    if parameterization != "flow":
        param["schedule"] = "${..schedule}"
    model = {
        "backbone": {"_target_": target, **OmegaConf.to_container(OmegaConf.create(dict(net.config)))},
        "text_encoder": {"_target_": "ldm.models.text_encoder.openclip.OpenCLIPTextEncoder",
                         "model_name": "ldm-tiny-text", "pretrained": None, "layer": "penultimate"},
        "autoencoder": {"_target_": "ldm.models.autoencoder.export.load_autoencoder", "path": "autoencoder"},
        "process": {"_target_": "ldm.diffusion.process.DiffusionProcess", "schedule": SCHEDULES[schedule],
                    "parameterization": param,
                    "shift": {"_target_": "ldm.diffusion.shift.TimestepShift", "shift": 1.0}},
    }
    card = {"model": model, "resolution": 32, "weights": "raw", "source": "test",
            "autoencoder_sha256": weights_hash(ae)}
    OmegaConf.save(OmegaConf.create(card), folder / "pipeline.yaml")
    return folder


# -------------------------------------------------------------------------------------------------------
# The proof: same images, same network outputs per step
# -------------------------------------------------------------------------------------------------------


def _record(module: torch.nn.Module, calls: list, timestep_arg: int) -> torch.utils.hooks.RemovableHandle:
    def hook(module, args, kwargs, output):
        t = args[timestep_arg] if len(args) > timestep_arg else kwargs["timestep"]
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)  # return_dict=False
        calls.append((torch.as_tensor(t).reshape(-1)[0].item(), out.clone()))

    return module.register_forward_hook(hook, with_kwargs=True)


def generate_both(export: Path, out: Path, steps: int, guidance: float, spacing: str = "auto", seed: int = 3):
    """(ours, theirs, our backbone calls, their UNet calls): images in [0, 1] from our pipeline (sampler auto =
    unipc at these step counts) and from StableDiffusionPipeline.from_pretrained on the export, same start."""
    from diffusers import StableDiffusionPipeline

    ours = load_pipeline(export)
    export_diffusers(export, out)
    theirs = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    our_calls: list = []
    their_calls: list = []
    handles = [_record(ours.backbone, our_calls, 1), _record(theirs.unet, their_calls, 1)]
    try:
        a = ours.generate([PROMPT], [seed], steps=steps, guidance=guidance, spacing=spacing).images
        # our noise for this seed (a CPU generator per image) at our first sigma, in diffusers' VP form
        # x_vp = x_ve / sqrt(1 + sigma^2): diffusers multiplies `latents` by init_noise_sigma = 1 and starts there
        noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed))[None]
        sigma0 = ours.sigmas(steps, spacing, (8, 8), "unipc")[0].double()
        latents = (noise * sigma0 / torch.sqrt(1 + sigma0**2)).float()
        b = theirs(PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   output_type="pt").images
    finally:
        for h in handles:
            h.remove()
    return (a + 1) / 2, b, our_calls, their_calls


@pytest.mark.slow
@pytest.mark.parametrize("parameterization,schedule,spacing", [
    ("v", "scaled_linear", "auto"), ("eps", "scaled_linear", "auto"),
    ("v", "scaled_linear_zero_snr", "trailing")], ids=["v", "eps", "v_zero_snr"])
def test_stable_diffusion_pipeline_gives_our_images(parameterization: str, schedule: str, spacing: str,
                                                    tmp_path: Path) -> None:
    export = make_export(tmp_path / "ours", parameterization=parameterization, schedule=schedule)
    ours, theirs, our_calls, their_calls = generate_both(export, tmp_path / "diffusers", steps=30, guidance=4.0,
                                                         spacing=spacing)
    assert theirs.shape == ours.shape == (1, 3, 32, 32)
    assert 0.02 < ours.std() and ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.5  # not a flat or clipped image
    error = (ours - theirs).abs().max().item()
    assert error <= 1 / 255, f"max pixel difference {error * 255:.4f}/255"  # the bar
    # measured 0.0008-0.001/255 (v, eps), 0.0001/255 (zero SNR); a 1% error in the exported scaling_factor gives
    # 0.17/255, under the bar: this bound is the one that catches such a mistake
    assert error <= 0.02 / 255, f"max pixel difference {error * 255:.4f}/255"
    # the network, call by call: ours batches [cond, uncond], diffusers [uncond, cond]
    assert len(our_calls) == len(their_calls) == 30
    # diffusers' UniPC casts its timesteps to int64: off the integer grid (the exponential ladder) its UNet sees t
    # rounded down, which moves the network's output by < 1e-3 of its size (measured 8e-4); on it (trailing), exact
    fractional = spacing != "trailing"
    for (t_ours, out_ours), (t_theirs, out_theirs) in zip(our_calls, their_calls, strict=True):
        assert t_ours - 1.001 < t_theirs <= t_ours + 1e-3 if fractional else t_theirs == pytest.approx(t_ours, abs=1e-3)
        out_theirs = torch.cat(out_theirs.chunk(2)[::-1])
        tol = 2e-3 if fractional else 1e-5
        assert (out_ours - out_theirs).abs().max() <= tol * out_theirs.abs().max()


def test_export_folder_layout_and_note(tmp_path: Path) -> None:
    from diffusers import UniPCMultistepScheduler

    export = make_export(tmp_path / "ours", parameterization="eps")
    result = export_diffusers(export, tmp_path / "diffusers")
    out = tmp_path / "diffusers"
    assert result.pipeline == "StableDiffusionPipeline" and not result.missing
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "vae", "unet", "scheduler", "text_encoder",
                                               "tokenizer", NOTE}
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    scheduler = UniPCMultistepScheduler.from_pretrained(str(out / "scheduler"))
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.use_exponential_sigmas and scheduler.config.solver_order == 3
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(0.7) and vae["sample_size"] == 32
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 8
    note = json.loads((out / NOTE).read_text())
    assert note["pipeline"] == "StableDiffusionPipeline" and note["not_written"] == {}
    assert "unipc" in note["scheduler_matches"]


@pytest.mark.slow
def test_zero_snr_and_a_table_schedule_go_to_the_scheduler(tmp_path: Path) -> None:
    from diffusers import UniPCMultistepScheduler

    from ldm.diffusion.schedules import SigmoidSchedule

    for name in ("scaled_linear_zero_snr", "sigmoid"):
        export = make_export(tmp_path / name, schedule=name)
        export_diffusers(export, tmp_path / f"{name}_diffusers")
        scheduler = UniPCMultistepScheduler.from_pretrained(str(tmp_path / f"{name}_diffusers" / "scheduler"))
        assert scheduler.config.prediction_type == "v_prediction"
        if name == "sigmoid":  # no diffusers name for it: the table itself
            torch.testing.assert_close(scheduler.alphas_cumprod.double(), SigmoidSchedule().alphas_cumprod,
                                       rtol=1e-5, atol=1e-7)
        else:
            assert scheduler.config.rescale_betas_zero_snr and scheduler.alphas_cumprod[-1] == 2.0**-24


def test_dit_export_loads_in_pixart_with_equal_outputs_and_a_note(tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

    export = make_export(tmp_path / "ours", backbone="dit", schedule="rectified_flow", parameterization="flow")
    ours = load_pipeline(export)
    with pytest.warns(UserWarning, match="model_index.json not written: diffusers' pipelines for PixArt"):
        result = export_diffusers(export, tmp_path / "diffusers")
    out = tmp_path / "diffusers"
    theirs = PixArtTransformer2DModel.from_pretrained(str(out / "transformer"), local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 64, generator=g)
    c_noise = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context, timestep=c_noise).sample
        torch.testing.assert_close(ours.backbone(x, c_noise, Conditioning(context)), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.01
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler")).config.shift == 1.0
    assert not (out / "model_index.json").exists() and result.pipeline is None
    note = json.loads((out / NOTE).read_text())
    assert set(note["not_written"]) == {"model_index.json"} and "T5" in note["not_written"]["model_index.json"]
    assert {"transformer", "vae", "scheduler", "text_encoder", "tokenizer"} <= set(note["written"])


@pytest.mark.slow
def test_a_lightning_checkpoint_exports_its_ema_weights(stage2_runs: dict[str, Path], tmp_path: Path) -> None:
    """A real stage-2 `.ckpt` (experiment=ldm_tiny: cosine schedule, v, EMA callback), alone in a folder (its run's
    config not beside it): EMA by default, raw=True the raw weights; diffusers samples what we do."""
    from diffusers import StableDiffusionPipeline

    ckpt = tmp_path / "alone" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(stage2_runs["ckpt"].read_bytes())
    ema = export_diffusers(ckpt, tmp_path / "ema")
    raw = export_diffusers(ckpt, tmp_path / "raw", ema=False)
    assert ema.pipeline == raw.pipeline == "StableDiffusionPipeline"
    note = json.loads((tmp_path / "ema" / NOTE).read_text())
    assert note["weights"].startswith("ema (") and json.loads((tmp_path / "raw" / NOTE).read_text())["weights"] == "raw"
    theirs = StableDiffusionPipeline.from_pretrained(str(tmp_path / "ema"), local_files_only=True)
    assert theirs.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert theirs.scheduler.config.prediction_type == "v_prediction"
    # cosine's sigma rises steeply at t = 999: exponential sigmas would collide on diffusers' integer timesteps
    assert theirs.scheduler.config.timestep_spacing == "trailing" and "spacing=trailing" in note["scheduler_matches"]
    theirs.set_progress_bar_config(disable=True)
    ours = load_pipeline(ckpt)
    f, c = ours.autoencoder.downsample_factor, ours.autoencoder.latent_channels
    side = 32 // f
    a = (ours.generate([PROMPT], [5], steps=20, guidance=3.0, spacing="trailing").images + 1) / 2
    noise = torch.randn((c, side, side), generator=torch.Generator().manual_seed(5))[None]
    sigma0 = ours.sigmas(20, "trailing", (side, side), "unipc")[0].double()
    b = theirs(PROMPT, latents=(noise * sigma0 / torch.sqrt(1 + sigma0**2)).float(), num_inference_steps=20,
               guidance_scale=3.0, height=32, width=32, output_type="pt").images
    error = (a - b).abs().max().item()
    assert error <= 0.02 / 255, f"max pixel difference {error * 255:.4f}/255"  # measured 0.00015/255


def test_mmdit_export_loads_in_sd3_with_equal_outputs_and_names_the_pooled_embedding(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    export = make_export(tmp_path / "ours", backbone="mmdit", schedule="rectified_flow", parameterization="flow")
    ours = load_pipeline(export)
    with pytest.warns(UserWarning) as warned:
        result = export_diffusers(export, tmp_path / "diffusers")
    assert any("pooled text embedding not written" in str(w.message) for w in warned)
    theirs = SD3Transformer2DModel.from_pretrained(str(tmp_path / "diffusers" / "transformer"),
                                                   local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 64, generator=g), \
        torch.randn(2, 64, generator=g)
    c_noise = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=c_noise).sample
        torch.testing.assert_close(ours.backbone(x, c_noise, Conditioning(context, pooled)), expected,
                                   atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.01
    assert set(result.missing) == {"model_index.json", "pooled text embedding"}


# -------------------------------------------------------------------------------------------------------
# What diffusers cannot represent, and bad input
# -------------------------------------------------------------------------------------------------------


def test_a_schedule_diffusers_cannot_express_is_left_out_and_named(tmp_path: Path) -> None:
    export = make_export(tmp_path / "ours", schedule="karras", parameterization="eps")
    with pytest.warns(UserWarning) as warned:
        result = export_diffusers(export, tmp_path / "diffusers")
    messages = [str(w.message) for w in warned]
    assert any("scheduler not written: the schedule KarrasSchedule is continuous" in m for m in messages)
    assert any("model_index.json not written: StableDiffusionPipeline needs every part" in m for m in messages)
    out = tmp_path / "diffusers"
    assert (out / "unet" / "config.json").is_file() and (out / "vae" / "config.json").is_file()
    assert not (out / "scheduler").exists() and not (out / "model_index.json").exists()
    assert set(result.missing) == {"scheduler", "model_index.json"}
    assert "KarrasSchedule" in json.loads((out / NOTE).read_text())["not_written"]["scheduler"]


def test_channel_latent_statistics_block_the_sd_pipeline_only(tmp_path: Path) -> None:
    export = make_export(tmp_path / "ours", latent_norm="channel")
    with pytest.warns(UserWarning, match="latents_mean, latents_std .StableDiffusionPipeline applies only"):
        result = export_diffusers(export, tmp_path / "diffusers")
    vae = json.loads((tmp_path / "diffusers" / "vae" / "config.json").read_text())
    assert vae["latents_std"] == [0.5, 1.0, 1.5, 2.0] and result.pipeline is None


def test_an_unknown_or_old_file_is_refused_by_name(tmp_path: Path) -> None:
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, old)  # a CompVis-style file
    with pytest.raises(ValueError, match="not a stage-2 .diffusion. checkpoint of ldm"):
        export_diffusers(old, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="without pipeline.yaml"):
        export_diffusers(tmp_path, tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_diffusers(tmp_path / "missing.ckpt", tmp_path / "out3")


def test_refuses_to_overwrite_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    export = make_export(tmp_path / "ours")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an earlier diffusers export"):
        export_diffusers(export, tmp_path / "busy")
    assert (tmp_path / "busy" / "precious.txt").is_file()


def test_a_backbone_diffusers_cannot_represent_is_an_error(tmp_path: Path) -> None:
    export = make_export(tmp_path / "ours", backbone="dit")
    card = OmegaConf.load(export / "pipeline.yaml")
    card.model.backbone.mlp_ratio = 2.0  # diffusers' PixArt has a 4x MLP
    OmegaConf.save(card, export / "pipeline.yaml")
    net = DiT(**{k: v for k, v in OmegaConf.to_container(card.model.backbone).items() if k != "_target_"})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(export / "backbone.safetensors"))
    with pytest.raises(ValueError, match="cannot be written as diffusers' PixArtTransformer2DModel: .*4x MLP"):
        export_diffusers(export, tmp_path / "diffusers")


def test_script_writes_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_diffusers_script",
                                                  Path(__file__).parents[1] / "scripts" / "export_diffusers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    export = make_export(tmp_path / "ours")
    script.main([f"ckpt={export}", f"out={tmp_path / 'd'}", "raw=true"])
    assert "StableDiffusionPipeline.from_pretrained" in capsys.readouterr().out
    assert (tmp_path / "d" / "model_index.json").is_file()
    assert not math.isnan(json.loads((tmp_path / "d" / NOTE).read_text())["resolution"])
