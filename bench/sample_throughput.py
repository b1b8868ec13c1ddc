"""Text-to-image sampling throughput (images/s) of our `LatentDiffusionPipeline` against diffusers, in one process,
with the same converted weights, prompts, seeds, sampler, steps and guidance, and a check that both draw the same
images.

diffusers' `StableDiffusionPipeline` cannot be built here: its text encoder and tokenizer are `transformers` classes,
and `transformers` is not installed. The diffusers side is therefore a hand-written loop that does what
`StableDiffusionPipeline.__call__` does: encode prompt and negative prompt "" (here with our OpenCLIP text encoder,
on both sides, so text encoding costs the same), `scheduler.set_timesteps`, `prepare_latents` (per-sample CPU
generators via `randn_tensor`, times `init_noise_sigma`), then per step `cat([latents] * 2)`, `scale_model_input`,
one batched UNet forward with [uncond, cond] embeddings, classifier-free guidance in eps/v space, `scheduler.step`,
and finally `vae.decode(latents / scaling_factor)` and postprocessing to [0, 1]. The safety checker is left out.
The loop passes `latents=` (as a pipeline user can) with the noise scaled so that both sides start from the same
point: diffusers' own default starts VP schedulers (DPM-Solver, UniPC, DDIM) at x = noise, ours at x = noise *
sigma_max in VE form, which in VP form is noise * sqrt(1 - alpha_bar_T) (0.2% smaller on scaled_linear).

Weights: random diffusers `UNet2DConditionModel` and `AutoencoderKL` are built first and converted into ours with
`ldm.models.{unet,autoencoder}.convert`, so both sides run the same numbers. Presets (v-prediction, as our configs):
`tiny` = ldm_tiny (conf/model/backbone/unet_tiny.yaml, conf/model/autoencoder/tiny.yaml, the tiny OpenCLIP text tower,
cosine schedule, 32 px); `sd-like` = the mini-SD UNet of bench/unet_step.py (SD 2.x block layout at width 64) with
the kl_f8_c4 autoencoder (conf/model/autoencoder/kl_f8_c4.yaml), scaled_linear schedule, 256 px on CUDA with a
randomly initialised OpenCLIP ViT-H-14 text tower (77 x 1024; no weights can be downloaded), 64 px on CPU with the
tiny text tower (77 x 64; the UNet's cross-attention width follows the text encoder).

Timing: one call = prompts -> decoded images (text encoding, noise, sampling, VAE decode; model construction
excluded), after one warm-up call per side; the two sides alternate, median of `--repeats` calls. With `--dtype bf16`
ours runs the UNet under bf16 autocast and decodes in fp32 (`generate(precision="bf16")`); the diffusers loop does
the same; a second row compares diffusers run as `StableDiffusionPipeline(torch_dtype=torch.bfloat16)` does (UNet,
VAE and text encoder weights in bf16) with ours so (`pipeline.cast_weights(torch.bfloat16)`, sample.py
weights_dtype=bf16). The image check is the max |difference| of the [0, 1] images against ours: in
fp32 about 1e-5 with the default dpmpp_2m / trailing (also euler, heun, ddim, unipc on scaled_linear); up to ~1e-3
for Euler and Heun on the cosine schedule, whose first step from sigma_max ~ 2e4 cancels two large float32 numbers
in a different order on each side; ~3e-3 on karras ladders for DPM-Solver / UniPC, where diffusers rounds the
timesteps the UNet sees to integers. DPM-Solver's and UniPC's leading / linspace spacings are defined differently
from ours (different images by construction; see bench/samplers.py), and diffusers' multistep solvers raise on
karras / exponential ladders of the cosine schedule.

    python bench/sample_throughput.py                                     # both presets, CPU, fp32
    python bench/sample_throughput.py --device cuda --dtype bf16          # tiny batch 64, sd-like batch 16 at 256 px
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import OmegaConf
from torch import Tensor

from ldm.diffusion.parameterization import VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import CosineSchedule, ScaledLinearSchedule
from ldm.inference.pipeline import LatentDiffusionPipeline
from ldm.models.autoencoder.convert import (
    autoencoder_kwargs_from_diffusers_config,
    convert_diffusers_autoencoder,
)
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.convert import convert_diffusers_unet, unet_kwargs_from_diffusers_config
from ldm.models.unet.unet import UNet
from ldm.utils.device import resolve_device

CONF = Path(__file__).resolve().parents[1] / "conf/model"
SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# diffusers configs; the UNet's cross_attention_dim is the text encoder's width. `yaml`: our preset it must equal.
UNETS = {
    "tiny": (dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                  use_linear_projection=True), CONF / "backbone/unet_tiny.yaml"),
    "mini_sd": (dict(block_out_channels=(64, 128, 256, 256), attention_head_dim=(1, 2, 4, 4), layers_per_block=2,
                     down_block_types=SD_DOWN, up_block_types=SD_UP, use_linear_projection=True), None),
}
AUTOENCODERS = {
    "tiny": (dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  mid_block_add_attention=False, scaling_factor=0.5), CONF / "autoencoder/tiny.yaml"),
    "kl_f8_c4": (dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                      latent_channels=4, scaling_factor=0.18215), CONF / "autoencoder/kl_f8_c4.yaml"),
}
TEXT_ENCODERS = {"tiny": "ldm-tiny-text", "vit-h-14": "ViT-H-14"}  # open_clip names, random init
SCHEDULES = {  # ours, diffusers' beta arguments
    "cosine": (CosineSchedule, dict(beta_schedule="squaredcos_cap_v2")),
    "scaled_linear": (ScaledLinearSchedule, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
}
PRESETS = {  # unet, autoencoder, schedule, then (CPU, CUDA) defaults: resolution, batch, text encoder
    "tiny": ("tiny", "tiny", "cosine", (32, 32), (8, 64), ("tiny", "tiny")),
    "sd-like": ("mini_sd", "kl_f8_c4", "scaled_linear", (64, 256), (2, 16), ("tiny", "vit-h-14")),
}
# Deterministic samplers only: stochastic ones draw their noise differently by construction.
SCHEDULERS = {
    "dpmpp_2m": partial(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2,
                        final_sigmas_type="zero"),
    "euler": EulerDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "ddim": partial(DDIMScheduler, clip_sample=False, set_alpha_to_one=True),
    "unipc": partial(UniPCMultistepScheduler, solver_order=3, solver_type="bh2", predict_x0=True,
                     final_sigmas_type="zero"),  # our unipc's default order
}
VE_SCHEDULERS = (EulerDiscreteScheduler, HeunDiscreteScheduler)  # hold x = x0 + sigma n; the others alpha x
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a wooden table",
           "a watercolor painting of a lighthouse at dusk", "a close-up photo of a cat's face"]


# ---------------------------------------------------------------------------------------------------------------------
# Building both sides from one set of weights.


def _check_preset(kwargs: dict, yaml: Path | None) -> None:
    if yaml is None:
        return
    preset = OmegaConf.to_container(OmegaConf.load(yaml))
    differ = {k: (v, kwargs[k]) for k, v in preset.items()
              if k in kwargs and (tuple(v) if isinstance(v, list) else v) != kwargs[k]}
    assert not differ, f"{yaml.name}: (ours, converted) differ: {differ}"


def build(preset: str, text: str, device: torch.device) -> dict:
    """Our pipeline and the diffusers parts (UNet, VAE, scheduler config) with identical weights."""
    unet_name, ae_name, schedule_name = PRESETS[preset][:3]
    torch.manual_seed(0)
    text_encoder = OpenCLIPTextEncoder(model_name=TEXT_ENCODERS[text], pretrained=None)
    unet_config, unet_yaml = UNETS[unet_name]
    theirs_unet = UNet2DConditionModel(**unet_config, cross_attention_dim=text_encoder.width).eval()
    theirs_unet.set_attn_processor(AttnProcessor2_0())
    unet_kwargs = unet_kwargs_from_diffusers_config(theirs_unet.config)
    _check_preset(unet_kwargs, unet_yaml)
    unet = UNet(**unet_kwargs).eval()
    unet.load_state_dict(convert_diffusers_unet(theirs_unet.state_dict()), strict=True)

    ae_config, ae_yaml = AUTOENCODERS[ae_name]
    theirs_vae = DiffusersAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(ae_config["block_out_channels"]),
                                        up_block_types=("UpDecoderBlock2D",) * len(ae_config["block_out_channels"]),
                                        **ae_config).eval()
    ae_kwargs = autoencoder_kwargs_from_diffusers_config(theirs_vae.config)
    _check_preset(ae_kwargs, ae_yaml)
    autoencoder = AutoencoderKL(**ae_kwargs).eval()
    autoencoder.load_state_dict(convert_diffusers_autoencoder(theirs_vae.state_dict(), theirs_vae.config), strict=True)

    schedule_cls, betas = SCHEDULES[schedule_name]
    schedule = schedule_cls()
    ours = LatentDiffusionPipeline(unet, text_encoder, autoencoder, DiffusionProcess(schedule, VPrediction(schedule))).to(device)
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in autoencoder.parameters())
    return dict(ours=ours, unet=theirs_unet.to(device), vae=theirs_vae.to(device), text_encoder=text_encoder,
                scheduler_kwargs=dict(num_train_timesteps=1000, prediction_type="v_prediction", **betas),
                n_params=n_params)


def make_scheduler(sampler: str, spacing: str, kwargs: dict):
    """diffusers' scheduler for our sampler and spacing (our `leading` has no steps_offset)."""
    factory = SCHEDULERS[sampler]
    if spacing in ("karras", "exponential"):
        return factory(**kwargs, **{f"use_{spacing}_sigmas": True})
    return factory(**kwargs, timestep_spacing=spacing, steps_offset=0)


# ---------------------------------------------------------------------------------------------------------------------
# The diffusers side: StableDiffusionPipeline.__call__, step by step.


def start_scale(scheduler) -> float:
    """x_start / noise that makes the scheduler start where ours does (see the module docstring)."""
    if hasattr(scheduler, "sigmas"):
        sigma = float(scheduler.sigmas[0])
    else:  # DDIM: the train-table sigma at the first timestep
        alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
        sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    return sigma if isinstance(scheduler, VE_SCHEDULERS) else sigma / (1 + sigma**2) ** 0.5


@torch.no_grad()
def diffusers_generate(unet: UNet2DConditionModel, vae: DiffusersAutoencoderKL, text_encoder: OpenCLIPTextEncoder,
                       scheduler, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                       size: int, autocast: torch.dtype | None = None) -> Tensor:
    """Images (B, 3, H, W) in [0, 1], as StableDiffusionPipeline(prompts, negative_prompt="", ...).images."""
    device, dtype = unet.device, unet.dtype
    batch = len(prompts)
    # 3. encode_prompt: negative first, as the pipeline concatenates them
    cond = text_encoder.encode(list(prompts)).tokens
    uncond = text_encoder.encode([""] * batch).tokens
    prompt_embeds = torch.cat([uncond, cond]).to(device, dtype)
    # 4. retrieve_timesteps
    scheduler.set_timesteps(steps, device=device)
    # 5. prepare_latents, with latents= given: the per-sample noise scaled to our starting point
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
    shape = (batch, unet.config.in_channels, size // f, size // f)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    latents = noise * (start_scale(scheduler) / scheduler.init_noise_sigma)  # what we pass as latents=
    latents = latents * scheduler.init_noise_sigma  # prepare_latents
    # 7. denoising loop
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        with amp:
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        noise_pred = noise_pred.to(latents.dtype)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)  # image_processor.postprocess(output_type="pt")


# ---------------------------------------------------------------------------------------------------------------------
# Timing.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    sync(device)
    start = time.perf_counter()
    images = fn()
    sync(device)
    return time.perf_counter() - start, images


def run_preset(preset: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    resolution = args.resolution or PRESETS[preset][3][int(cuda)]
    batch = args.batch or PRESETS[preset][4][int(cuda)]
    text = args.text or PRESETS[preset][5][int(cuda)]
    parts = build(preset, text, device)
    ours: LatentDiffusionPipeline = parts["ours"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    bf16 = args.dtype == "bf16"
    scheduler = make_scheduler(args.sampler, args.spacing, parts["scheduler_kwargs"])
    common = dict(steps=args.steps, guidance=args.guidance)

    def run_ours(pipeline: LatentDiffusionPipeline) -> Tensor:
        out = pipeline.generate(prompts, seeds, sampler=args.sampler, spacing=args.spacing, height=resolution,
                                width=resolution, precision=args.dtype, **common)
        return (out.images + 1) / 2

    sides: dict[str, Callable[[], Tensor]] = {
        "ours": partial(run_ours, ours),
        "diffusers": partial(diffusers_generate, parts["unet"], parts["vae"], parts["text_encoder"], scheduler,
                             prompts, seeds, size=resolution, autocast=torch.bfloat16 if bf16 else None, **common),
    }
    pairs = [("ours", "diffusers")]  # (our side, the diffusers side it is compared with)
    if bf16:  # how diffusers is usually run: StableDiffusionPipeline.from_pretrained(..., torch_dtype=bfloat16)
        weights = {k: copy.deepcopy(parts[k]).to(torch.bfloat16) for k in ("unet", "vae", "text_encoder")}
        sides["diffusers bf16 weights"] = partial(diffusers_generate, weights["unet"], weights["vae"],
                                                  weights["text_encoder"], copy.deepcopy(scheduler), prompts, seeds,
                                                  size=resolution, **common)
        # and ours the same way: sample.py weights_dtype=bf16
        sides["ours bf16 weights"] = partial(run_ours, copy.deepcopy(ours).cast_weights(torch.bfloat16))
        pairs.append(("ours bf16 weights", "diffusers bf16 weights"))
    images = {name: fn() for name, fn in sides.items()}  # warm-up (and the images to compare)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():  # alternate, so drifts (clocks, other load) hit all alike
            times[name].append(timed(fn, device)[0])

    rows = []
    for mine, name in pairs:
        ours_ips, theirs_ips = (batch / statistics.median(times[side]) for side in (mine, name))
        rows.append(dict(preset=preset, ours_run=mine, diffusers=name, batch=batch, steps=args.steps,
                         resolution=resolution, text=text, ours=ours_ips, theirs=theirs_ips,
                         ratio=ours_ips / theirs_ips, max_diff=(images[mine] - images[name]).abs().max().item(),
                         finite=bool(images[mine].isfinite().all()), n_params=parts["n_params"]))
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, device_name: str) -> None:
    precision = "bf16 autocast (UNet), fp32 decode" if args.dtype == "bf16" else "fp32"
    print(f"\ntext-to-image on {device_name}, {precision}, {args.sampler} / {args.spacing}, guidance {args.guidance}, "
          f"median of {args.repeats} calls after a warm-up; img/s = batch / (prompts -> decoded images)")
    print("| preset | ours run | diffusers run | batch | steps | px | text | ours img/s | diffusers img/s | "
          "ours/diffusers | max abs diff [0, 1] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['preset']} | {r['ours_run']} | {r['diffusers']} | {r['batch']} | {r['steps']} | "
              f"{r['resolution']} | {r['text']} | {r['ours']:.2f} | {r['theirs']:.2f} | {r['ratio']:.3f} | "
              f"{r['max_diff']:.1e} |")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        unet, ae = next(r["n_params"] for r in rows if r["preset"] == preset)
        print(f"{preset}: UNet {unet / 1e6:.2f}M, autoencoder {ae / 1e6:.2f}M parameters")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    args.device = device.type
    if args.quick:
        args.steps, args.repeats, args.batch = 4, 1, args.batch or 2
    rows = []
    for preset in (PRESETS if args.preset == "both" else [args.preset]):
        rows += run_preset(preset, args, device)
    print_table(rows, args, torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=[*PRESETS, "both"], default="both")
    p.add_argument("--batch", type=int, default=0, help="default: tiny 8 / sd-like 2 on CPU, 64 / 16 on CUDA")
    p.add_argument("--resolution", type=int, default=0, help="default: tiny 32; sd-like 64 on CPU, 256 on CUDA")
    p.add_argument("--text", choices=list(TEXT_ENCODERS), default="",
                   help="text tower (random init); default tiny, sd-like on CUDA vit-h-14")
    p.add_argument("--sampler", choices=list(SCHEDULERS), default="dpmpp_2m")
    p.add_argument("--spacing", choices=["trailing", "leading", "linspace", "karras", "exponential"],
                   default="trailing")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (meant for CUDA)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 steps, batch 2, one repeat")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
