"""The SD single-file layout (`ldm.interop.single_file`, key maps in `ldm.interop.compvis`): diffusers' own single-file converters are the oracle for
our export, a file written from random diffusers weights imports to the same functions, ours -> file -> ours is
bit-exact, and what the layout cannot hold (or a file that is not one) is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from tiny_sd import (
    diffusers_unet,
    diffusers_vae,
    ours_autoencoder,
    ours_unet,
    randomize,
    text_encoder,
)

import ldm.models.text_encoder
from ldm.interop.single_file import (
    SD_LATENT_SCALE,
    UNET_PREFIX,
    VAE_PREFIX,
    load_single_file,
    read_single_file,
    save_single_file,
    single_file_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Attention at both levels, at the inner one only, at the outer one only; linear or 1x1-conv projections.
UNET_VARIANTS = {
    "both_linear": {},
    "inner_conv": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), use_linear_projection=False,
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2),
    "outer_linear": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def released(path: Path, unet, vae, text=None) -> Path:
    """A file as a release ships it: CompVis keys, no header of ours (so no heads, no prediction, no latent scale)."""
    save_file(single_file_state(unet, vae, text), str(path))
    return path


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_unet_export_is_what_diffusers_single_file_converter_reads(variant: str) -> None:
    theirs = diffusers_unet(**UNET_VARIANTS[variant])
    state = single_file_state(ours_unet(theirs), ours_autoencoder(diffusers_vae()))
    compvis = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    rebuilt = convert_ldm_unet_checkpoint(compvis, dict(theirs.config))
    assert rebuilt.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(rebuilt[key].reshape(value.shape), value), key


def test_vae_export_is_what_diffusers_single_file_converter_reads() -> None:
    theirs = diffusers_vae()
    state = single_file_state(ours_unet(diffusers_unet()), ours_autoencoder(theirs))
    rebuilt = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(VAE_PREFIX)},
                                         dict(theirs.config))
    assert rebuilt.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(rebuilt[key], value), key


def test_diffusers_from_single_file_loads_our_file_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The public route users load a ComfyUI/A1111 checkpoint with in diffusers (`from_single_file`, offline with a
    local config folder): bit for bit the diffusers models our file was made from."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet, vae = diffusers_unet(), diffusers_vae()
    unet.save_pretrained(tmp_path / "config" / "unet")
    vae.save_pretrained(tmp_path / "config" / "vae")
    path = save_single_file(tmp_path / "m.safetensors", ours_unet(unet), ours_autoencoder(vae), text_encoder(),
                            prediction="v")
    for cls, theirs, part in ((UNet2DConditionModel, unet, "unet"), (DiffusersAutoencoderKL, vae, "vae")):
        loaded = cls.from_single_file(str(path), config=str(tmp_path / "config"), subfolder=part,
                                      local_files_only=True).state_dict()
        assert loaded.keys() == theirs.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in theirs.state_dict().items())


def test_openclip_text_export_gives_diffusers_sd2_text_encoder_the_same_states() -> None:
    """diffusers reads an SD 2.x file's OpenCLIP tower into a transformers CLIPTextModel: the penultimate layer after
    the final norm must be our encoding."""
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    ours = text_encoder()
    state = single_file_state(ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae()), ours)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                         projection_dim=64)
    theirs = transformers.CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(theirs, state)
    converted.pop("text_projection.weight", None)  # only CLIPTextModelWithProjection has a projection
    # transformers 5 dropped the `text_model.` level of CLIPTextModel that diffusers' converter still names
    result = theirs.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"embeddings.position_ids"}, result
    tokens = ours.tokenize(["a red circle", "two squares on blue"])
    with torch.no_grad():
        out = theirs(input_ids=tokens, output_hidden_states=True)
        expected = theirs.final_layer_norm(out.hidden_states[-2])
        got = ours(tokens).tokens
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_file_written_from_diffusers_weights_imports_to_the_same_functions(tmp_path: Path) -> None:
    unet, vae = diffusers_unet(), diffusers_vae()
    path = released(tmp_path / "sd2-tiny.safetensors", ours_unet(unet), ours_autoencoder(vae), text_encoder())
    with pytest.raises(ValueError, match="do not split into 64-channel heads.*head_channels=N"):
        load_single_file(path, prediction="v")  # SD 2.x's 64-channel heads do not fit 32-wide levels
    loaded = load_single_file(path, prediction="v", head_channels=16)
    assert loaded.version == "v2" and loaded.prediction == "v"
    assert float(loaded.autoencoder.latent_scale) == pytest.approx(SD_LATENT_SCALE)  # the format's, not measured
    g = torch.Generator().manual_seed(3)
    x, context, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), \
        torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        expected, got = unet(x, torch.tensor([5, 900]), context).sample, loaded.backbone(x, torch.tensor([5, 900]),
                                                                                        context)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.autoencoder.decode(z), vae.decode(z).sample, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1


def test_ours_to_file_to_ours_is_bit_exact(tmp_path: Path) -> None:
    unet, vae, text = ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae()), text_encoder()
    path = save_single_file(tmp_path / "model.safetensors", unet, vae, text, prediction="eps", resolution=32)
    _, metadata = read_single_file(path)
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-512"
    loaded = load_single_file(path)  # heads, prediction and text model from the header: no arguments
    assert loaded.prediction == "eps" and loaded.version == "v2"
    for ours, back in ((unet, loaded.backbone), (vae, loaded.autoencoder), (text, loaded.text_encoder)):
        a, b = ours.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.backbone.config == unet.config
    assert loaded.text_encoder_config["model_name"] == "ldm-tiny-text"


def test_the_ema_copy_of_a_training_checkpoint_is_taken_by_default(tmp_path: Path) -> None:
    unet, vae = ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae())
    state = single_file_state(unet, vae)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v * 2 for k, v in state.items() if k.startswith(UNET_PREFIX)}
    torch.save({"state_dict": {**state, **ema, "model_ema.num_updates": torch.tensor(10)}}, tmp_path / "train.ckpt")
    default = load_single_file(tmp_path / "train.ckpt", prediction="eps", head_channels=16).backbone.state_dict()
    raw = load_single_file(tmp_path / "train.ckpt", prediction="eps", head_channels=16, ema=False).backbone.state_dict()
    assert all(torch.equal(default[k], 2 * v) and torch.equal(raw[k], v) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match="holds no model_ema"):
        load_single_file(released(tmp_path / "m.safetensors", unet, vae), prediction="eps", head_channels=16, ema=True)


def test_half_precision_files_load_into_fp32_models(tmp_path: Path) -> None:
    unet, vae = ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae())
    path = save_single_file(tmp_path / "m.safetensors", unet, vae, prediction="eps", dtype=torch.float16)
    state, _ = read_single_file(path)
    assert {v.dtype for v in state.values()} == {torch.float16}
    back = load_single_file(path).backbone.state_dict()
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], v.half().float())
               for k, v in unet.state_dict().items())


def test_a_weights_only_ckpt_reads_like_the_safetensors(tmp_path: Path) -> None:
    unet, vae = ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae())
    torch.save({"state_dict": single_file_state(unet, vae), "global_step": 10}, tmp_path / "model.ckpt")
    loaded = load_single_file(tmp_path / "model.ckpt", prediction="v", head_channels=16)
    assert all(torch.equal(v, loaded.backbone.state_dict()[k]) for k, v in unet.state_dict().items())
    assert loaded.text_encoder is None


# -------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------


def test_a_file_of_another_layout_names_what_was_expected(tmp_path: Path) -> None:
    save_file(dict(diffusers_unet().state_dict()), str(tmp_path / "diffusers_unet.safetensors"))
    with pytest.raises(ValueError, match=r"Unknown checkpoint layout: expected .*'model.diffusion_model.'.*"
                                         r"'first_stage_model.'.*found top-level names \['conv_in', 'conv_norm_out'"):
        load_single_file(tmp_path / "diffusers_unet.safetensors")


def test_a_unet_that_does_not_match_the_requested_config(tmp_path: Path) -> None:
    unet = ours_unet(diffusers_unet())
    path = released(tmp_path / "m.safetensors", unet, ours_autoencoder(diffusers_vae()))
    from omegaconf import OmegaConf

    fits = load_single_file(path, prediction="v", backbone=OmegaConf.create(unet.config))  # heads from the config
    assert fits.backbone.config == unet.config
    with pytest.raises(ValueError, match=r"does not match the requested config: model_channels: asked 320, file has "
                                         r"32, channel_mult: asked \[1, 2, 4, 4\], file has \[1, 2\]"):
        load_single_file(path, prediction="v", head_channels=16,
                         backbone=dict(model_channels=320, channel_mult=[1, 2, 4, 4], context_dim=64))


def test_truncated_and_pickled_files_are_refused(tmp_path: Path) -> None:
    path = released(tmp_path / "m.safetensors", ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae()))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        load_single_file(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {}, "hook": torch.nn.Linear(1, 1)}, tmp_path / "code.ckpt")  # a module: needs pickle
    with pytest.raises(ValueError, match="could not be read as a weights-only torch checkpoint"):
        load_single_file(tmp_path / "code.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        load_single_file(tmp_path / "nope.safetensors")


def test_a_file_that_lacks_unet_weights_names_them(tmp_path: Path) -> None:
    state = single_file_state(ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae()))
    del state[UNET_PREFIX + "output_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['output_blocks.1.1.transformer_blocks.0.attn1.to_k.weight'\]"):
        load_single_file(tmp_path / "m.safetensors", prediction="v", head_channels=16)


def test_what_the_layout_cannot_hold_is_refused(tmp_path: Path) -> None:
    unet, vae = ours_unet(diffusers_unet(norm_num_groups=8)), ours_autoencoder(diffusers_vae())
    vae.set_latent_stats(scale=0.5)
    with pytest.raises(ValueError, match=r"the UNet has norm_groups=8; the layout fixes 32; the autoencoder's latent "
                                         r"scale is 0.5 .*latent_scale_check=False"):
        save_single_file(tmp_path / "m.safetensors", unet, vae, prediction="v")
    from ldm.models.dit import DiT

    dit = DiT(in_channels=4, out_channels=4, hidden_size=64, depth=1, num_heads=2, patch_size=2, context_dim=64,
              sample_size=8)
    with pytest.raises(ValueError, match="the backbone is a DiT: the SD single file holds a UNet"):
        save_single_file(tmp_path / "m.safetensors", dit, vae, prediction="v", latent_scale_check=False)
    path = save_single_file(tmp_path / "m.safetensors", ours_unet(diffusers_unet()), vae, prediction="v",
                            latent_scale_check=False)  # on request: our scale travels in the header
    assert float(load_single_file(path).autoencoder.latent_scale) == 0.5
    with pytest.raises(ValueError, match="prediction must be 'eps' or 'v'"):
        save_single_file(tmp_path / "m.safetensors", ours_unet(diffusers_unet()), vae, prediction="flow",
                         latent_scale_check=False)


def test_a_process_other_tools_would_sample_wrongly_is_refused() -> None:
    from ldm.diffusion.parameterization import EpsPrediction, FlowPrediction, VPrediction
    from ldm.diffusion.process import DiffusionProcess
    from ldm.diffusion.schedules import CosineSchedule, RectifiedFlow, ScaledLinearSchedule
    from ldm.diffusion.shift import TimestepShift
    from ldm.interop.single_file import sd_prediction

    sd = ScaledLinearSchedule()
    assert sd_prediction(DiffusionProcess(sd, VPrediction(sd))) == "v"
    assert sd_prediction(DiffusionProcess(sd, EpsPrediction(sd))) == "eps"
    with pytest.raises(ValueError, match=r"the schedule is CosineSchedule.*not SD's scaled-linear"):
        sd_prediction(DiffusionProcess(CosineSchedule(), VPrediction(CosineSchedule())))
    zsnr = ScaledLinearSchedule(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR included"):
        sd_prediction(DiffusionProcess(zsnr, VPrediction(zsnr)))
    with pytest.raises(ValueError, match=r"RectifiedFlow.*timestep shift.*predicts with FlowPrediction"):
        sd_prediction(DiffusionProcess(RectifiedFlow(), FlowPrediction(), TimestepShift(shift=3.0)))


def test_a_prediction_that_contradicts_the_file_is_refused(tmp_path: Path) -> None:
    path = save_single_file(tmp_path / "m.safetensors", ours_unet(diffusers_unet()), ours_autoencoder(diffusers_vae()),
                            prediction="v")
    with pytest.raises(ValueError, match="prediction=eps was asked for, but .* says its UNet predicts v"):
        load_single_file(path, prediction="eps")


def test_an_sd1_text_tower_conditions_as_in_transformers(tmp_path: Path) -> None:
    """SD 1.x files keep transformers' CLIP names (cond_stage_model.transformer.text_model.*): imported, our encoder's
    token states are the CLIPTextModel's last_hidden_state (SD 1.x conditions on the last layer)."""
    transformers = pytest.importorskip("transformers")
    unet = ours_unet(diffusers_unet())
    # ldm-tiny-text's sizes, with SD 1.x's quick GELU and 64-channel heads as the single-file import assumes
    clip = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
        hidden_act="quick_gelu")), 4)
    state = {**single_file_state(unet, ours_autoencoder(diffusers_vae())),
             **{"cond_stage_model.transformer.text_model." + k: v.contiguous() for k, v in clip.state_dict().items()}}
    save_file(state, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ValueError, match="no registered open_clip architecture has a text tower"):
        load_single_file(tmp_path / "sd1.safetensors", head_channels=16)  # no quick-GELU tower of these sizes
    open_clip.add_model_config(_quickgelu_tiny(tmp_path))
    loaded = load_single_file(tmp_path / "sd1.safetensors", head_channels=16)
    assert loaded.version == "v1" and loaded.prediction == "eps" and loaded.text_encoder.layer == "last"
    prompts = ["a red circle on a blue background", ""]
    with torch.no_grad():
        expected = clip(input_ids=loaded.text_encoder.tokenize(prompts)).last_hidden_state
        torch.testing.assert_close(loaded.text_encoder.encode(prompts).tokens, expected, rtol=1e-5, atol=1e-5)


def _quickgelu_tiny(directory: Path) -> Path:
    """ldm-tiny-text with quick GELU and one 64-channel head, registered with open_clip (as a user registers an
    architecture it does not ship)."""
    config = json.loads((Path(ldm.models.text_encoder.__file__).parent / "configs" / "ldm-tiny-text.json").read_text())
    config["quick_gelu"], config["text_cfg"]["heads"] = True, 1
    path = directory / "ldm-tiny-text-quickgelu.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_real_sd_geometries_map_like_diffusers(version: str) -> None:
    """SD 1.5's and SD 2.x's full-size UNet and VAE, on the meta device (no memory): diffusers' converter reads our
    export's key names and shapes into exactly its own model's, and the shapes alone give back our preset."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import UNet2DConditionModel
    from test_unet_parity import SD1_CONFIG, SD2_CONFIG

    from ldm.interop.compvis import autoencoder_to_compvis, unet_kwargs_from_compvis, unet_to_compvis
    from ldm.models.autoencoder.kl import PRESETS, AutoencoderKL
    from ldm.models.unet.convert import unet_kwargs_from_diffusers_config
    from ldm.models.unet.unet import UNet

    config = SD2_CONFIG if version == "v2" else SD1_CONFIG
    with torch.device("meta"):
        theirs, vae = UNet2DConditionModel(**config), DiffusersAutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        kwargs = unet_kwargs_from_diffusers_config(theirs.config)
        ours, ours_vae = UNet(**kwargs), AutoencoderKL(**PRESETS["kl_f8_c4"])
    compvis = unet_to_compvis(ours.state_dict())
    rebuilt = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in compvis.items()}, dict(theirs.config))
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == {k: tuple(v.shape) for k, v in
                                                              theirs.state_dict().items()}
    assert len(rebuilt) == len(compvis)  # no key of ours left behind (the converter skips what it does not know)
    inferred = unet_kwargs_from_compvis(compvis, version=version)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in inferred.items()} == kwargs
    vae_compvis = {VAE_PREFIX + k: v for k, v in autoencoder_to_compvis(ours_vae.state_dict()).items()}
    rebuilt = convert_ldm_vae_checkpoint(vae_compvis, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(rebuilt) == len(vae_compvis)


def test_released_text_towers_match_their_open_clip_architecture() -> None:
    from ldm.interop.compvis import match_openclip_model

    sizes = dict(context_length=77, vocab_size=49408)
    assert match_openclip_model(dict(sizes, width=1024, layers=24, embed_dim=1024)) == "ViT-H-14"  # SD 2.x
    assert match_openclip_model(dict(sizes, width=768, layers=12, embed_dim=768), quick_gelu=True) \
        == "ViT-L-14-quickgelu"  # SD 1.x's OpenAI CLIP
    with pytest.raises(ValueError, match="no registered open_clip architecture has a text tower of .*'width': 96"):
        match_openclip_model(dict(sizes, width=96, layers=3, embed_dim=96))
