"""Training-step time, memory and achieved FLOP/s of our `DiT` and `MMDiT` against diffusers'
`PixArtTransformer2DModel` and `SD3Transformer2DModel` with the same configuration and the same (converted) weights:
forward, MSE, backward and a fused AdamW step, fp32 on CPU or bf16 autocast (fp32 master weights) on CUDA.

Presets (text tokens 77; all weights from our init, copied to diffusers by `ldm.models.convert_transformers`):
  tiny  conf/model/backbone/dit_tiny.yaml and mmdit_tiny.yaml on 8x8x4 latents, 77 x 64 text (+ 64 pooled).
  40m   dit_b2.yaml at width 512, depth 9, 8 heads (40,611,856 parameters) and mmdit_base.yaml at width 384,
        depth 8, 6 heads (42,130,704): 32x32x4 latents (256 px with kl-f8, 256 tokens), 77 x 1024 text (+ 1024 pooled).
  b2    dit_b2.yaml (119.2M) and mmdit_base.yaml (145.5M) on 32x32x4 latents, 77 x 1024 text (+ 1024 pooled); on
        CUDA the batch defaults to the largest multiple of 8 (at most 512) that both sides fit into 60% of free memory,
        extrapolated from probe steps at batch 8 and 16 (also for 40m on CUDA).
Both contenders of a backbone run alternately in one process on the same batch, `--steps` steps per repeat; the best
repeat counts. diffusers runs its default SDPA processors; neither side gets a text mask (SD3 trains without one).

FLOPs: `FlopCounterMode` counts one forward + backward of each side (AdamW's elementwise work is not counted);
achieved FLOP/s = that / best step time. MFU is against `--peak-tflops`, else the dense bf16 peak of the GPU by name
(H100 SXM / H200: 989 TFLOP/s), else on CPU against an fp32 2048^3 matmul timed in the same run.
Memory: "saved MiB" sums the distinct storages autograd saves for backward during one forward (saved_tensors_hooks;
parameters excluded), the activation memory a step holds at its peak, measured alike on both sides and on any device
(tracemalloc does not see torch's allocator). On CUDA "peak MiB" is `max_memory_allocated` during a step above the
level before it (weights, gradients and AdamW moments of both models are resident then).

    python bench/backbone_step.py --preset tiny                       # CPU fp32
    python bench/backbone_step.py --preset 40m --threads 1
    python bench/backbone_step.py --device cuda --dtype bf16 --preset b2
    python bench/backbone_step.py --device cuda --dtype bf16 --preset b2 --compile   # regional compile, both sides
    python bench/backbone_step.py --preset b2 --smoke                 # CPU: 2 blocks, 8x8 latents, one step
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.backbone import Conditioning
from ldm.models.convert_transformers import dit_to_diffusers, mmdit_to_diffusers
from ldm.models.dit import DiT
from ldm.utils.compile import compile_blocks
from ldm.utils.device import resolve_device
from ldm.utils.flops import BF16_PEAK_TFLOPS as PEAK_TFLOPS
from ldm.utils.flops import CPU_SDPA_FLOPS

CONF = Path(__file__).resolve().parents[1] / "conf/model/backbone"
WIDTH_40M = {"dit": dict(hidden_size=512, depth=9, num_heads=8), "mmdit": dict(hidden_size=384, depth=8, num_heads=6)}
PRESETS = {  # yaml per backbone, overrides per backbone, latent side, default batch (CPU, CUDA; 0 = fill memory)
    "tiny": (dict(dit="dit_tiny", mmdit="mmdit_tiny"), {}, 8, (16, 256)),
    "40m": (dict(dit="dit_b2", mmdit="mmdit_base"), WIDTH_40M, 32, (2, 0)),
    "b2": (dict(dit="dit_b2", mmdit="mmdit_base"), {}, 32, (2, 0)),
}
TOKENS = 77


# -------------------------------------------------------------------------------------------------------
# Contenders and steps
# -------------------------------------------------------------------------------------------------------


def build(backbone: str, preset: str, device: torch.device, smoke: bool) -> dict[str, nn.Module]:
    """Ours from the preset and diffusers' model from its converted config and weights (strict load)."""
    names, overrides, _, _ = PRESETS[preset]
    cfg = OmegaConf.load(CONF / f"{names[backbone]}.yaml")
    cfg.update(overrides.get(backbone, {}))
    if smoke:
        cfg.depth = min(cfg.depth, 2)
    torch.manual_seed(0)
    ours = instantiate(cfg)
    config, state_dict = (dit_to_diffusers if isinstance(ours, DiT) else mmdit_to_diffusers)(ours)
    theirs = (PixArtTransformer2DModel if isinstance(ours, DiT) else SD3Transformer2DModel)(**config)
    theirs.load_state_dict(state_dict, strict=True)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
    return {"ours": ours.to(device).train(), "diffusers": theirs.to(device).train()}


def make_inputs(model: nn.Module, batch: int, size: int, device: torch.device) -> tuple[Tensor, ...]:
    """Latents, timesteps in [0, 1000), text tokens, pooled text (MMDiT) and a target, all on `device`."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, TOKENS, model.context_dim, generator=g)
    pooled = torch.randn(batch, model.pooled_dim or 1, generator=g)
    target = torch.randn(batch, model.out_channels, size, size, generator=g)
    return tuple(v.to(device) for v in (x, t, context, pooled, target))


def make_loss(model: nn.Module, inputs: tuple[Tensor, ...], autocast: bool) -> Callable[[], Tensor]:
    """Forward + MSE, called the way each library is called."""
    x, t, context, pooled, target = inputs
    if isinstance(model, PixArtTransformer2DModel):
        def forward() -> Tensor:
            return model(x, encoder_hidden_states=context, timestep=t).sample
    elif isinstance(model, SD3Transformer2DModel):
        def forward() -> Tensor:
            return model(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample
    else:
        cond = Conditioning(context, pooled if model.pooled_dim else None)

        def forward() -> Tensor:
            return model(x, t, cond)

    def loss() -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            out = forward()
        return F.mse_loss(out.float(), target)

    return loss


def make_step(model: nn.Module, loss: Callable[[], Tensor]) -> tuple[Callable[[], None], Callable[[], None]]:
    """(full training step with fused AdamW, forward + backward only)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    def step() -> None:
        forward_backward()
        opt.step()

    return step, forward_backward


# -------------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> tuple[float, float | None]:
    """Wall seconds per call and, on CUDA, the peak MiB allocated above the level before the first call."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def saved_mib(model: nn.Module, loss: Callable[[], Tensor]) -> float:
    """MiB of the distinct storages autograd saves for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss()  # the graph is freed on return
    return sum(saved.values()) / 2**20


def step_flops(forward_backward: Callable[[], None]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        forward_backward()
    return counter.get_total_flops()


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, what it is): --peak-tflops, the GPU's dense bf16 figure, or a measured CPU fp32 matmul."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            raise ValueError(f"no bf16 peak known for {name!r} (known: {', '.join(PEAK_TFLOPS)}): pass --peak-tflops")
        return peak * 1e12, f"{peak:.0f} TFLOP/s, the dense bf16 peak of {name}"
    n = 512 if args.smoke else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, 3, device)[0] for _ in range(3))
    return 2 * n**3 / best, f"{2 * n**3 / best / 1e12:.3f} TFLOP/s of an fp32 {n}^3 matmul timed here"


def fill_batch(models: dict[str, nn.Module], size: int, device: torch.device, autocast: bool) -> int:
    """The largest multiple of 8 whose step fits both sides into 85% of the free CUDA memory: each side's memory per
    sample is the growth of its step's peak from batch 8 to 16 (what does not grow with the batch cancels)."""
    per_sample = 0.0
    for model in models.values():
        peaks = []
        for batch in (8, 16):
            step, _ = make_step(model, make_loss(model, make_inputs(models["ours"], batch, size, device), autocast))
            step()  # gradients and AdamW moments exist from here on: the probe sees the step's own memory
            peaks.append(timed(step, 1, device)[1])
            del step
        per_sample = max(per_sample, (peaks[1] - peaks[0]) * 2**20 / 8)
        model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    # The timed steps bring back the gradients and AdamW moments (3 x the fp32 weights) the probes let go.
    states = sum(3 * p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    # 0.6, not more, and at most 512: on an H200 (139 GiB) the estimate at 0.85 (~900 for b2) ran out of memory in
    # the first step, and b2 DiT's MFU grows little past 128 (22.4% eager, 34.8% compiled at 128; 2026-11-28).
    return min(512, max(8, int(0.6 * (free - states) / per_sample) // 8 * 8))


def run(backbone: str, args: argparse.Namespace, device: torch.device, peak: float) -> list[dict]:
    cuda, autocast = device.type == "cuda", args.dtype == "bf16"
    _, _, size, batches = PRESETS[args.preset]
    size = 8 if args.smoke else size
    models = build(backbone, args.preset, device, args.smoke)
    batch = args.batch or (2 if args.smoke else batches[int(cuda)]) or fill_batch(models, size, device, autocast)
    inputs = make_inputs(models["ours"], batch, size, device)
    losses = {side: make_loss(m, inputs, autocast) for side, m in models.items()}
    fns = {side: make_step(models[side], loss) for side, loss in losses.items()}
    flops = {side: step_flops(fb) for side, (_, fb) in fns.items()}
    saved = {side: saved_mib(models[side], loss) for side, loss in losses.items()}
    if args.compile:  # regional: every transformer block of both sides; FLOPs and saved memory are the eager ones
        for model in models.values():
            compile_blocks(model.transformer_blocks)
    for step, _ in fns.values():  # warm-up: allocator, AdamW states, kernel autotuning
        timed(step, args.warmup, device)
    times: dict[str, list[float]] = {side: [] for side in fns}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for side, (step, _) in fns.items():  # alternate, so drifts (clocks, other load) hit both alike
            seconds, mib = timed(step, args.steps, device)
            times[side].append(seconds)
            if mib is not None:
                peaks[side] = max(peaks.get(side, 0.0), mib)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    rows = []
    for side, ts in times.items():
        seconds = min(ts)
        rows.append(dict(preset=args.preset, backbone=backbone, side=side, params=n_params, batch=batch, size=size,
                         ms=1e3 * seconds, samples_per_s=batch / seconds, flops=flops[side],
                         tflops=flops[side] / seconds / 1e12, mfu=flops[side] / seconds / peak,
                         saved_mib=saved[side], peak_mib=peaks.get(side)))
    rows[0]["ratio"] = rows[0]["ms"] / rows[1]["ms"]
    rows[0]["saved_ratio"] = rows[0]["saved_mib"] / rows[1]["saved_mib"]
    return rows


# -------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], args: argparse.Namespace, device: torch.device, peak_text: str) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    precision = "bf16 autocast" if args.dtype == "bf16" else "fp32"
    precision += ", blocks compiled" if args.compile else ""
    print(f"\nbackbone train step (fwd + MSE + bwd + fused AdamW) on {name}, {precision}, best of {args.repeats} x "
          f"{args.steps} steps; MFU against {peak_text}")
    print("| preset | backbone | side | params | batch | latent | ms/step | samples/s | TFLOP/s | MFU | saved MiB | "
          "peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {r['preset']} | {r['backbone']} | {r['side']} | {r['params'] / 1e6:.2f}M | {r['batch']} | "
              f"{r['size']}x{r['size']} | {r['ms']:.1f} | {r['samples_per_s']:.1f} | {r['tflops']:.3f} | "
              f"{100 * r['mfu']:.1f}% | {r['saved_mib']:.1f} | {peak} |")
    for r in rows:
        if "ratio" in r:
            print(f"{r['preset']} {r['backbone']}: step time ours/diffusers = {r['ratio']:.3f} (target <= 0.85), "
                  f"saved activations ours/diffusers = {r['saved_ratio']:.3f}, fwd+bwd "
                  f"{r['flops'] / r['batch'] / 1e9:.2f} GFLOP per sample")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    if args.dtype == "bf16" and device.type != "cuda" and not args.smoke:
        raise ValueError("--dtype bf16 is meant for CUDA (bf16 on a CPU is far slower than fp32); add --smoke to "
                         "check the code path on a CPU")
    if args.smoke:
        args.repeats, args.steps, args.warmup = 1, 1, 1
    args.steps = args.steps or (10 if device.type == "cuda" or args.preset == "tiny" else 2)
    peak, peak_text = peak_flops(args, device)
    rows = []
    for backbone in ("dit", "mmdit") if args.backbone == "both" else (args.backbone,):
        rows += run(backbone, args, device, peak)
    print_table(rows, args, device, peak_text)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--backbone", choices=["dit", "mmdit", "both"], default="both")
    p.add_argument("--batch", type=int, default=0,
                   help="default: tiny 16 (CPU) / 256 (CUDA); 40m and b2 2 (CPU) / as many as fit (CUDA)")
    p.add_argument("--steps", type=int, default=0, help="steps per timed repeat (default 10; 40m and b2 on CPU 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (meant for CUDA)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block of both sides")
    p.add_argument("--smoke", action="store_true", help="one step, batch 2, 8x8 latents, at most 2 blocks")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
