"""Stage-2 training throughput from cached latents against encoding images on the fly: the same `DiffusionModule`,
optimizer and batches, in one process, plus the UNet's model FLOPs utilisation (MFU).

A step is `DiffusionModule.training_step`'s computation: `module.latents(batch)` (a draw from the cached posterior
when the batch holds "latent" = (B, 2, c, h, w) = (mean, std), else the frozen autoencoder's encoder on "image"),
`embed_captions` with caption dropout, the DenoisingLoss forward (v-prediction, MinSNR-5), backward, gradient-norm
clipping at 1.0 (foreach, as `configure_gradient_clipping`) and a fused AdamW step. Logging and the NaN guard need a
Trainer and are left out (bench/stage2_overhead.py measures what Lightning adds: under 10%). With `--dtype bf16` the
forward runs under bf16 autocast, as Lightning's "bf16-mixed". The text encoder runs on every step on both paths.

Both kinds of batch are built in memory and already on the device, so data loading is excluded and the ratio isolates
the encoder's cost. The real loader saves more than that: from a latent cache it also skips JPEG decoding and
resizing, and it copies (B, 2, 4, 32, 32) latents to the GPU instead of (B, 3, 256, 256) images.

MFU: FlopCounterMode counts one UNet forward at the training batch size; training FLOPs are taken as 3x that
(forward + backward), achieved FLOP/s = training FLOPs / step time, MFU = achieved / peak. The peak is
`--peak-tflops`, else the dense bf16 figure for the GPU's name (H100 SXM 989, H100 PCIe 756, H200 989, A100 312);
on CPU it is n/a. The autoencoder's encoder and the text encoder forwards are counted too, as a share of the UNet's
training FLOPs.

Presets: `tiny` (ldm_tiny: tiny f4 autoencoder, tiny UNet, tiny text tower, cosine schedule, 32 px, batch 64) and
`ldm_256` (conf/model/autoencoder/kl_f8_c4.yaml, conf/model/backbone/unet_base.yaml, scaled_linear; 256 px, batch 32 on CUDA
with a randomly initialised OpenCLIP ViT-H-14 text tower, as pretrained weights cannot be downloaded; on CPU 64 px,
batch 2 and the tiny text tower, the UNet's context_dim following the text width). All weights are random.

    python bench/stage2_step.py                                            # CPU: tiny
    python bench/stage2_step.py --preset ldm_256 --batch 2 --resolution 64  # CPU smoke run of the big parts
    python bench/stage2_step.py --device cuda --dtype bf16 --preset ldm_256
    python bench/stage2_step.py --device cuda --dtype bf16 --preset ldm_256 --batch 256 --ablate  # speed options, cumulatively
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.parameterization import VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import CosineSchedule, ScaledLinearSchedule
from ldm.diffusion.weighting import MinSNR
from ldm.lightning.diffusion_module import DiffusionModule
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.utils.compile import compile_blocks
from ldm.utils.device import resolve_device
from ldm.utils.flops import CPU_SDPA_FLOPS, bf16_peak_flops

CONF = Path(__file__).resolve().parents[1] / "conf/model"
TEXT_ENCODERS = {"tiny": "ldm-tiny-text", "vit-h-14": "ViT-H-14"}  # open_clip names, random init
SCHEDULES = {"cosine": CosineSchedule, "scaled_linear": ScaledLinearSchedule}
PRESETS = {  # autoencoder yaml, UNet yaml, schedule, then (CPU, CUDA) defaults: resolution, batch, text encoder
    "tiny": ("tiny", "tiny", "cosine", (32, 32), (64, 64), ("tiny", "tiny")),
    "ldm_256": ("kl_f8_c4", "base", "scaled_linear", (64, 256), (2, 32), ("tiny", "vit-h-14")),
}
ABLATIONS = ("text_cache", "compile", "channels_last", "compile_full")  # --ablate's default, in order
CAPTIONS = ["a photograph of an astronaut riding a horse", "a red cube on a wooden table",
            "a watercolor painting of a lighthouse at dusk", "a close-up photo of a cat's face"]



def build(preset: str, text: str, device: torch.device) -> DiffusionModule:
    ae_name, unet_name, schedule_name = PRESETS[preset][:3]
    torch.manual_seed(0)
    text_encoder = OpenCLIPTextEncoder(model_name=TEXT_ENCODERS[text], pretrained=None)
    unet = instantiate(OmegaConf.load(CONF / f"backbone/unet_{unet_name}.yaml"), context_dim=text_encoder.width)
    autoencoder = instantiate(OmegaConf.load(CONF / f"autoencoder/{ae_name}.yaml"))
    autoencoder.set_latent_stats(0.18215, torch.zeros(autoencoder.latent_channels),
                                 torch.ones(autoencoder.latent_channels))
    schedule = SCHEDULES[schedule_name]()
    process, loss = DiffusionProcess(schedule, VPrediction(schedule)), DenoisingLoss(weighting=MinSNR(5.0))
    optimizer = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01, fused=True)
    return DiffusionModule(backbone=unet, process=process, text_encoder=text_encoder, autoencoder=autoencoder, loss=loss,
                           optimizer=optimizer).to(device).train()


def make_batches(module: DiffusionModule, n: int, batch: int, resolution: int, device: torch.device
                 ) -> dict[str, list[dict]]:
    """n image batches on the device, and the same images as cached posteriors (mean, std), as the cache stores them."""
    g = torch.Generator().manual_seed(0)
    images, latents = [], []
    for _ in range(n):
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
        x = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
        with torch.no_grad():
            posterior = module.autoencoder.encode(x)
        images.append({"image": x, "caption": captions})
        latents.append({"latent": torch.stack([posterior.mean, posterior.std], 1), "caption": captions})  # (B, 2, c, h, w)
    return {"images (encoded on the fly)": images, "cached latents": latents}


def make_step(module: DiffusionModule, optimizer: torch.optim.Optimizer, autocast: torch.dtype | None
              ) -> Callable[[dict], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    device_type = module.device.type

    def step(batch: dict) -> None:
        with torch.autocast(device_type, dtype=autocast) if autocast is not None else nullcontext():
            z = module.latents(batch)  # (B, c, H/f, W/f)
            context, _ = module.embed_captions(batch["caption"], module.cond_drop_prob)
            loss = module.loss(module.backbone, z, context).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_flops(module: DiffusionModule, batch: dict, autocast: torch.dtype | None) -> dict[str, int]:
    """FLOPs of one forward of the UNet, the autoencoder's encoder and the text encoder at this batch."""
    x = batch["image"]
    counts = {}
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast) if autocast is not None else nullcontext():
        z = module.encode_images(x)
        context, _ = module.embed_captions(batch["caption"])
        t = torch.rand(x.shape[0], device=x.device) * 999
        parts = {"unet": lambda: module.backbone(z, t, context), "encoder": lambda: module.autoencoder.encode(x),
                 "text": lambda: module.text_encoder.encode(batch["caption"])}
        for name, fn in parts.items():
            with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
                fn()
            counts[name] = counter.get_total_flops()
    return counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[dict], None], batches: list[dict], steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps cycling through the batches."""
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    return bf16_peak_flops(device)


def setup(preset: str, args: argparse.Namespace, device: torch.device
          ) -> tuple[DiffusionModule, torch.optim.Optimizer, tuple[int, int, str, torch.dtype | None]]:
    """The module and its optimizer, and (resolution, batch, text tower, autocast dtype) from the preset's defaults
    for this device and the arguments."""
    cuda = device.type == "cuda"
    resolution = args.resolution or PRESETS[preset][3][int(cuda)]
    batch = args.batch or PRESETS[preset][4][int(cuda)]
    text = args.text or PRESETS[preset][5][int(cuda)]
    module = build(preset, text, device)
    return module, module.configure_optimizers(), (resolution, batch, text,
                                                   torch.bfloat16 if args.dtype == "bf16" else None)


def run_preset(preset: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    module, optimizer, (resolution, batch, text, autocast) = setup(preset, args, device)
    data = make_batches(module, args.batches, batch, resolution, device)
    flops = forward_flops(module, data["images (encoded on the fly)"][0], autocast)
    step = make_step(module, optimizer, autocast)
    for batches in data.values():  # warm-up: AdamW states, allocator, cudnn autotuning
        timed(step, batches, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in data}
    for _ in range(args.repeats):
        for name, batches in data.items():  # alternate, so drifts (clocks, other load) hit both alike
            times[name].append(timed(step, batches, args.steps, device))

    peak = peak_flops(args, device)
    train_flops = 3 * flops["unet"]
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        achieved = train_flops / seconds
        rows.append(dict(preset=preset, input=name, batch=batch, resolution=resolution, text=text,
                         images_per_s=batch / seconds, ms_per_step=1e3 * seconds, tflops=achieved / 1e12,
                         mfu=achieved / peak if peak else None, flops=flops,
                         n_params=sum(p.numel() for p in module.backbone.parameters())))
    rows[1]["ratio"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows


def ablate(preset: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """What each speed option buys, cumulatively, on cached latents: the plain step, then each option of
    `args.ablate` added to the previous ones on the same module and batches. Options: `text_cache` (the frozen text
    encoder's prompt cache, `model.text_encoder.cache_size`), `channels_last` (`model.channels_last`), `compile`
    (regional: `model.compile_backbone=blocks`), `compile_full` (the whole backbone instead of its blocks:
    `model.compile_backbone=full`), `cudagraphs` (the whole backbone compiled with mode="reduce-overhead": CUDA
    graphs, which the sync-free step allows). Each row is printed as soon as it is measured."""
    module, optimizer, (resolution, batch, text, autocast) = setup(preset, args, device)
    batches = make_batches(module, args.batches, batch, resolution, device)["cached latents"]
    train_flops = 3 * forward_flops(module, make_batches(module, 1, batch, resolution, device)
                                    ["images (encoded on the fly)"][0], autocast)["unet"]
    step, peak = make_step(module, optimizer, autocast), peak_flops(args, device)
    backbone = module.backbone

    def text_cache() -> None:
        module.text_encoder.cache_size = 4 * len(CAPTIONS)

    def channels_last() -> None:  # before the optimizer, whose fused step needs its states in the params' layout
        nonlocal step
        backbone.to(memory_format=torch.channels_last)
        step = make_step(module, module.configure_optimizers(), autocast)

    def uncompile() -> None:  # undo nn.Module.compile (it only sets this attribute)
        for m in backbone.modules():
            m._compiled_call_impl = None

    def compile_full(**options: object) -> None:
        uncompile()
        backbone.compile(backend=args.compile_backend, **options)

    options = {"text_cache": ("+ text encoder cache", text_cache), "channels_last": ("+ channels_last", channels_last),
               "compile": ("+ compile blocks", lambda: compile_blocks(backbone.blocks(), backend=args.compile_backend)),
               "compile_full": ("+ compile whole backbone (not blocks)", compile_full),
               "cudagraphs": ("+ CUDA graphs (whole backbone, reduce-overhead)",
                              lambda: compile_full(mode="reduce-overhead"))}
    unknown = set(args.ablate.split(",")) - set(options)
    if unknown:
        raise SystemExit(f"--ablate: unknown option(s) {sorted(unknown)}; options: {', '.join(options)}")
    rows = []
    for name, change in [("plain step", None), *(options[o] for o in args.ablate.split(","))]:
        start = time.perf_counter()
        if change is not None:
            change()
        timed(step, batches, args.warmup, device)  # compiles, if the change asks for it
        warmup_s = time.perf_counter() - start
        seconds = statistics.median(timed(step, batches, args.steps, device) for _ in range(args.repeats))
        achieved = train_flops / seconds
        rows.append(dict(preset=preset, input=f"cached latents, {name} (warm-up {warmup_s:.0f} s)", batch=batch, resolution=resolution, text=text,
                         images_per_s=batch / seconds, ms_per_step=1e3 * seconds, tflops=achieved / 1e12,
                         mfu=achieved / peak if peak else None))
        print(rows[-1], flush=True)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if args.dtype == "bf16" else "fp32"
    peak = peak_flops(args, device)
    peak_text = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known (MFU n/a)"
    print(f"\nstage-2 step (v + MinSNR loss, bwd, clip, fused AdamW) on {name}, {precision}, {peak_text}; median of "
          f"{args.repeats} x {args.steps} steps; UNet training FLOPs = 3 x forward")
    print("| preset | batch | px | text | input | img/s | ms/step | UNet TFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['preset']} | {r['batch']} | {r['resolution']} | {r['text']} | {r['input']} | "
              f"{r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['tflops']:.3f} | {mfu} |")
    for r in rows:
        if "ratio" in r:
            f = r["flops"]
            print(f"{r['preset']}: UNet {r['n_params'] / 1e6:.1f}M, forward {f['unet'] / r['batch'] / 1e9:.2f} GFLOP "
                  f"per image; cached latents / on the fly = {r['ratio']:.3f} img/s; encoder forward = "
                  f"{100 * f['encoder'] / (3 * f['unet']):.1f}% and text encoder forward = "
                  f"{100 * f['text'] / (3 * f['unet']):.1f}% of the UNet's training FLOPs")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    args.device = device.type
    if args.quick:
        args.steps, args.repeats, args.warmup, args.batches = 2, 1, 1, 1
    presets = args.preset or ("tiny" if device.type == "cpu" else "both")
    rows = []
    for preset in (PRESETS if presets == "both" else [presets]):
        rows += (ablate if args.ablate else run_preset)(preset, args, device)
    print_table(rows, args, device)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=[*PRESETS, "both"], default="", help="default: tiny on CPU, both on CUDA")
    p.add_argument("--batch", type=int, default=0, help="default: tiny 64; ldm_256 2 on CPU, 32 on CUDA")
    p.add_argument("--resolution", type=int, default=0, help="default: tiny 32; ldm_256 64 on CPU, 256 on CUDA")
    p.add_argument("--text", choices=list(TEXT_ENCODERS), default="",
                   help="text tower (random init); default tiny, ldm_256 on CUDA vit-h-14")
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per input kind")
    p.add_argument("--batches", type=int, default=2, help="distinct in-memory batches the steps cycle through")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (meant for CUDA)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, one repeat, one batch")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --ablate's compile options")
    p.add_argument("--ablate", nargs="?", const=",".join(ABLATIONS), default="",
                   help="cached latents only: the plain step, then each of these options added to the previous "
                        f"(comma-separated, in order; default {','.join(ABLATIONS)})")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
