"""LatentDiffusionPipeline on tiny random parts: seeds, img2img, inpainting, RePaint and every bad-input error."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.parameterization import VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import CosineSchedule
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.unet import UNet

PROMPTS = ["a small red circle on a blue background", "a large green star on a white background",
           "a small blue cross in the top left corner, on a black background"]


def tiny_pipeline() -> LatentDiffusionPipeline:
    """Random tiny parts on the cosine schedule with v-prediction, 32 px."""
    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                       mid_attention=False, norm_groups=4)
    ae.set_latent_stats(0.7, torch.zeros(4), torch.ones(4))
    unet = UNet(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), num_heads=None, head_channels=8, context_dim=64, norm_groups=4)
    for p in unet.parameters():  # the SD init zeroes the output conv: give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    text = OpenCLIPTextEncoder(model_name="ldm-tiny-text", pretrained=None)
    schedule = CosineSchedule()
    return LatentDiffusionPipeline(unet, text, ae, DiffusionProcess(schedule, VPrediction(schedule)), resolution=32).eval()


@pytest.fixture(scope="module")
def pipeline() -> LatentDiffusionPipeline:
    return tiny_pipeline()


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def images(n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def centre_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return mask


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_same_seed_same_image_at_any_batch_size(pipeline: LatentDiffusionPipeline, sampler: str) -> None:
    batch = pipeline.generate(PROMPTS, [5, 6, 7], sampler=sampler, steps=6)
    alone = pipeline.generate(PROMPTS[1:2], [6], sampler=sampler, steps=6)
    torch.testing.assert_close(alone.latents[0], batch.latents[1], rtol=1e-4, atol=1e-4)
    other = pipeline.generate(PROMPTS[1:2], [7], sampler=sampler, steps=6)
    assert (other.latents - alone.latents).abs().max() > 1e-2  # another seed is another image
    assert batch.images.shape == (3, 3, 32, 32) and bool(batch.finite.all())


def test_guidance_and_negative_prompt_change_the_result(pipeline: LatentDiffusionPipeline) -> None:
    base = pipeline.generate(PROMPTS[:1], [0], steps=4, guidance=1.0).latents
    guided = pipeline.generate(PROMPTS[:1], [0], steps=4, guidance=5.0).latents
    negative = pipeline.generate(PROMPTS[:1], [0], steps=4, guidance=5.0, negative_prompt="a red circle").latents
    # a random UNet barely listens to its context: any change shows the prompts reached it
    assert (base - guided).abs().max() > 1e-5 and (guided - negative).abs().max() > 1e-5


def test_img2img_strength_one_starts_from_noise_and_low_strength_stays_close(
        pipeline: LatentDiffusionPipeline) -> None:
    image = images()
    known = pipeline.encode(image)
    txt2img = pipeline.generate(PROMPTS[:1], [3], steps=8).latents
    full = pipeline.generate(PROMPTS[:1], [3], steps=8, image=image, strength=1.0).latents
    # at sigma_max ~ 2e4 the image is 1e-4 of the start: strength 1 is text-to-image with the same noise
    torch.testing.assert_close(full, txt2img, rtol=1e-2, atol=1e-2)
    light = pipeline.generate(PROMPTS[:1], [3], steps=8, image=image, strength=0.25).latents
    assert (light - known).abs().mean() < 0.5 * (txt2img - known).abs().mean()


@pytest.mark.parametrize("repaint", [0, 3])
def test_inpainting_keeps_the_known_latents_exactly(pipeline: LatentDiffusionPipeline, repaint: int) -> None:
    image, mask = images(), centre_mask()
    known = pipeline.encode(image)
    out = pipeline.generate(PROMPTS[:1], [1], steps=6, image=image, mask=mask, repaint=repaint)
    keep = torch.ones_like(known, dtype=torch.bool)
    keep[..., 2:6, 2:6] = False  # pixels 8..24 of 32 at f=4
    torch.testing.assert_close(out.latents[keep], known[keep], rtol=0, atol=1e-5)
    assert (out.latents[~keep] - known[~keep]).abs().mean() > 0.1  # the hole was generated, not copied


def test_inpainting_with_a_blank_mask_reconstructs_the_image(pipeline: LatentDiffusionPipeline) -> None:
    image = images()
    out = pipeline.generate(PROMPTS[:1], [1], steps=4, image=image, mask=torch.zeros(1, 1, 32, 32))
    torch.testing.assert_close(out.images, pipeline.decode(pipeline.encode(image)), rtol=0, atol=1e-5)


def test_default_size_is_the_training_resolution(pipeline: LatentDiffusionPipeline) -> None:
    assert pipeline.generate(PROMPTS[:1], [0], steps=1).images.shape[-2:] == (32, 32)
    assert pipeline.generate(PROMPTS[:1], [0], steps=1, height=16, width=48).images.shape[-2:] == (16, 48)


@pytest.mark.parametrize(("aspect", "size"), [("1:1", (32, 32)), ("16:9", (24, 40)), ("9:16", (40, 24)),
                                              ("3:2", (24, 40)), ("4:3", (24, 40)), ("5:4", (32, 32)), ("3:1", (16, 48))])
def test_an_aspect_ratio_picks_the_nearest_size_of_the_training_area(pipeline: LatentDiffusionPipeline,
                                                                    aspect: str, size: tuple[int, int]) -> None:
    """32 px training, multiples of 8: the bucket of ~32^2 pixels whose ratio is nearest in log ratio (4:3 goes to
    5:3, 5:4 to 1:1)."""
    assert pipeline.aspect_size(aspect) == size
    h, w = size
    assert h * w <= 32 * 32 and h % pipeline.latent_factor == 0 and w % pipeline.latent_factor == 0
    assert pipeline.generate(PROMPTS[:1], [0], steps=1, height=h, width=w).images.shape[-2:] == size
    with pytest.raises(ValueError, match="aspect must be 'W:H'"):
        pipeline.aspect_size("wide")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"height": 30}, r"multiples of 8 .*try 32x32"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"image": images(), "strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"image": images(), "strength": 1.5}, r"strength must be in \(0, 1\]"),
    ({"image": images(), "strength": 0.05, "steps": 4}, "leaves no step to run"),
    ({"image": images(), "mask": torch.zeros(1, 1, 16, 16)}, r"mask must be \(B, 1, 32, 32\)"),
    ({"mask": torch.zeros(1, 1, 32, 32)}, "inpainting needs the image"),
    ({"image": torch.zeros(1, 1, 32, 32)}, r"image must be \(B, 3, H, W\)"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_bad_input_is_a_clear_error(pipeline: LatentDiffusionPipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipeline.generate(PROMPTS[:1], [0], **kwargs)


def test_one_seed_per_prompt(pipeline: LatentDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match="one seed per prompt"):
        pipeline.generate(PROMPTS, [0])


def test_a_nan_sample_is_flagged(pipeline: LatentDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = pipeline.backbone.forward
    monkeypatch.setattr(pipeline.backbone, "forward", lambda x, *a, **k: forward(x, *a, **k) * float("nan"))
    out = pipeline.generate(PROMPTS[:2], [0, 1], steps=2)
    assert not bool(out.finite.any())


def test_a_flow_process_samples_from_pure_noise_at_its_shift(pipeline: LatentDiffusionPipeline) -> None:
    """Rectified flow with a shift: the ladder starts at sigma = inf (t = 1) and is the process's at the latent size."""
    from ldm.diffusion.parameterization import FlowPrediction
    from ldm.diffusion.schedules import RectifiedFlow
    from ldm.diffusion.shift import TimestepShift

    flow = LatentDiffusionPipeline(pipeline.backbone, pipeline.text_encoder, pipeline.autoencoder,
                                   DiffusionProcess(RectifiedFlow(), FlowPrediction(), TimestepShift(shift=3.0)),
                                   resolution=32).eval()
    sigmas = flow.sigmas(6, "linspace", (8, 8))
    assert sigmas[0].isinf() and sigmas[-1] == 0
    plain = LatentDiffusionPipeline(pipeline.backbone, pipeline.text_encoder, pipeline.autoencoder,
                                    DiffusionProcess(RectifiedFlow(), FlowPrediction()), resolution=32)
    torch.testing.assert_close(sigmas[1:-1], 3.0 * plain.sigmas(6, "linspace", (8, 8))[1:-1])  # shift: sigma x 3
    for sampler in ("euler", "unipc", "dpmpp_2m_sde"):
        out = flow.generate(PROMPTS[:2], [0, 1], sampler=sampler, steps=6)
        assert bool(out.finite.all()) and out.latents.abs().max() < 100, sampler
    img2img = flow.generate(PROMPTS[:1], [0], steps=6, image=images(), strength=0.5)
    assert bool(img2img.finite.all())


def test_bf16_weights_sample_close_to_float32_and_keep_the_latent_statistics() -> None:
    """cast_weights(bf16): every weight in bf16 (diffusers' torch_dtype), the latent statistics and the outputs in
    float32, and the images within ~1/255 of the float32 ones (mean |diff| 0.004 on [-1, 1] here). bf16 autocast
    with float32 weights stays closer (1e-4): it keeps the norms, the text encoder and the decoder in float32."""
    reference, low = tiny_pipeline(), tiny_pipeline().cast_weights(torch.bfloat16)
    parts = (low.backbone, low.text_encoder, low.autoencoder)
    assert all(p.dtype == torch.bfloat16 for part in parts for p in part.parameters())
    assert low.autoencoder.latent_scale.dtype == torch.float32 and low.weights_dtype == torch.bfloat16
    kwargs = dict(steps=8, sampler="dpmpp_2m", guidance=3.0)
    seeds = [0, 1]
    full = reference.generate(PROMPTS[:2], seeds, **kwargs)
    mixed = reference.generate(PROMPTS[:2], seeds, precision="bf16", **kwargs)
    cast = low.generate(PROMPTS[:2], seeds, **kwargs)
    assert cast.images.dtype == torch.float32 and cast.latents.dtype == torch.float32 and bool(cast.finite.all())
    err_cast = (cast.images - full.images).abs().mean().item()
    err_mixed = (mixed.images - full.images).abs().mean().item()
    assert err_mixed < err_cast < 0.01, (err_cast, err_mixed)
    again = low.generate(PROMPTS[:2], seeds, precision="bf16", **kwargs)  # the same dtype named: the same images
    assert torch.equal(again.images, cast.images)
    with pytest.raises(ValueError, match="the weights fix the precision"):
        low.generate(PROMPTS[:1], [0], precision="fp16", **kwargs)
    variation = low.generate(PROMPTS[:1], [0], image=images(1), strength=0.5, **kwargs)  # encodes in bf16
    assert variation.images.dtype == torch.float32 and bool(variation.finite.all())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tiny_pipeline().cast_weights(torch.float64)
