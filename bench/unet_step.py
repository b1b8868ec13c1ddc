"""Training-step throughput, peak memory and achieved FLOP/s of our `UNet` against diffusers'
`UNet2DConditionModel` with the same geometry and the same weights: forward, MSE, backward and an AdamW step,
fp32 on CPU or bf16 autocast on CUDA.

Configs: `mini_sd` (SD 2.x block layout at width 64: 38.8M parameters, 32x32x4 latents, 64-channel heads,
77 x 1024 context) and `tiny` (conf/model/backbone/unet_tiny.yaml on 8x8x4 latents, 77 x 64 context). Both contenders run
alternately in one process, `--steps` steps per repeat, best repeat counts; diffusers uses its SDPA processor.
FLOP/s: `FlopCounterMode` counts one step's forward + backward FLOPs (AdamW's elementwise work is not counted),
divided by the best step time, as a fraction of this machine's matmul peak measured in the same run (a large fp32
matmul on CPU, bf16 8192^3 on CUDA). "outside fwd+bwd" = (step - forward/backward alone) / step, for ours.
Memory: on CUDA `max_memory_allocated` above the pre-step level; on CPU each contender runs once more in a
fresh subprocess that reports one step's peak-RSS growth after a warm-up step (as bench/autoencoder_step.py).

    python bench/unet_step.py                                 # both configs; CPU: mini_sd batch 2, tiny 16
    python bench/unet_step.py --config mini_sd --batch 32     # e.g. on CUDA
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ldm.models.unet.convert import convert_diffusers_unet, unet_kwargs_from_diffusers_config
from ldm.models.unet.unet import UNet
from ldm.utils.device import resolve_device
from ldm.utils.flops import CPU_SDPA_FLOPS

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
CONFIGS = {  # diffusers config, latent size, context tokens x width, default batch (CPU, CUDA)
    "mini_sd": (dict(block_out_channels=(64, 128, 256, 256), attention_head_dim=(1, 2, 4, 4), layers_per_block=2,
                     cross_attention_dim=1024, down_block_types=SD_DOWN, up_block_types=SD_UP,
                     use_linear_projection=True), 32, (77, 1024), (2, 32)),
    "tiny": (dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2, use_linear_projection=True), 8, (77, 64), (16, 128)),
}
TINY_YAML = Path(__file__).resolve().parents[1] / "conf/model/backbone/unet_tiny.yaml"


def build(name: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """Both contenders with identical weights; asserts the geometry and that parameter counts agree."""
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**CONFIGS[name][0])
    theirs.set_attn_processor(AttnProcessor2_0())
    kwargs = unet_kwargs_from_diffusers_config(theirs.config)
    if name == "tiny":
        preset = OmegaConf.to_container(OmegaConf.load(TINY_YAML))
        assert all((tuple(v) if isinstance(v, list) else v) == kwargs[k]
                   for k, v in preset.items() if k in kwargs), (preset, kwargs)
    ours = UNet(**kwargs)
    ours.load_state_dict(convert_diffusers_unet(theirs.state_dict()), strict=True)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert abs(n_ours - n_theirs) <= 0.01 * n_theirs, (n_ours, n_theirs)
    return {"ours": ours.to(device).train(), "diffusers": theirs.to(device).train()}


def make_inputs(name: str, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    _, size, (tokens, width), _ = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, width, generator=g)
    return tuple(v.to(device) for v in (x, t, context, torch.randn(x.shape, generator=g)))


def make_steps(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], autocast: bool, adamw: str = "fused"
               ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(full training step, forward + backward only)."""
    x, t, context, target = inputs
    impl = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[adamw]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **impl)
    diffusers = isinstance(model, UNet2DConditionModel)

    def forward_backward() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, context)
            out = out.sample if diffusers else out
        loss = F.mse_loss(out.float(), target)
        model.zero_grad(set_to_none=True)
        loss.backward()

    def step() -> None:
        forward_backward()
        opt.step()

    return step, forward_backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float, float | None]:
    """Wall seconds, process CPU seconds per call, and on CUDA the peak MiB above the starting allocation."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    sync(device)
    wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else None
    return wall, cpu, peak


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large matmul: fp32 2048^3 on CPU, bf16 8192^3 on CUDA (best of a few)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, 3, device)[0] for _ in range(3))
    return 2 * n**3 / best




def step_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def memory_child(args: argparse.Namespace) -> None:
    """Fresh process: one contender's peak RSS growth during one step, after a warm-up step."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config, name = args.memory_child.split(":")
    model = build(config, device)[name]
    step, _ = make_steps(model, make_inputs(config, args.batch, device), autocast=False, adamw=args.adamw)
    step()  # gradients and AdamW states exist from here on: they count as resident
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def cpu_peak_mib(config: str, name: str, args: argparse.Namespace, batch: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", f"{config}:{name}", "--batch", str(batch),
           "--threads", str(args.threads), "--adamw", args.adamw]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")  # large frees go back to the OS at once
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def run(config: str, args: argparse.Namespace, device: torch.device, peak_flops: float) -> None:
    cuda = device.type == "cuda"
    batch = args.batch or CONFIGS[config][3][int(cuda)]
    steps = args.steps or (10 if cuda or config == "tiny" else 1)
    models = build(config, device)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    inputs = make_inputs(config, batch, device)
    fns = {n: make_steps(m, inputs, autocast=cuda, adamw=args.adamw) for n, m in models.items()}
    flops = {n: step_flops(fb) for n, (_, fb) in fns.items()}
    for step, _ in fns.values():  # warm-up: allocator, AdamW states, cudnn autotuning
        for _ in range(args.warmup):
            step()
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in fns}
    fb_times: list[float] = []
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (step, _) in fns.items():  # alternate, so drifts (clocks, other load) hit both alike
            wall, cpu, peak = timed(step, steps, device)
            times[name].append((wall, cpu))
            if peak is not None:
                peaks[name] = max(peaks.get(name, 0.0), peak)
        fb_times.append(timed(fns["ours"][1], steps, device)[0])
    if not cuda and not args.no_memory:
        del models, fns
        peaks = {name: cpu_peak_mib(config, name, args, batch) for name in times}

    precision = "bf16 autocast" if cuda else f"fp32, {args.threads} threads"
    _, size, (tokens, width), _ = CONFIGS[config]
    print(f"\n{config}: {n_params / 1e6:.2f}M params, batch {batch} x 4x{size}x{size}, context {tokens}x{width}, "
          f"{precision}, AdamW {args.adamw}, best of {args.repeats} x {steps} steps")
    print(f"fwd+bwd FLOPs per step: ours {flops['ours'] / 1e9:.2f} G, diffusers {flops['diffusers'] / 1e9:.2f} G")
    print(f"{'model':<10} {'samples/s':>9} {'med':>7} {'ms/step':>8} {'cpu-s/step':>10} {'peak MiB':>8} "
          f"{'TFLOP/s':>8} {'% peak':>6}")
    for name, ts in times.items():
        wall, cpu = min(ts)
        peak = f"{peaks[name]:8.0f}" if name in peaks else f"{'-':>8}"
        achieved = flops[name] / wall
        print(f"{name:<10} {batch / wall:9.2f} {batch / statistics.median(w for w, _ in ts):7.2f} {1e3 * wall:8.1f} "
              f"{min(c for _, c in ts):10.2f} {peak} {achieved / 1e12:8.3f} {100 * achieved / peak_flops:6.1f}")
    ours, theirs = min(times["ours"])[0], min(times["diffusers"])[0]
    mem = f", peak memory ours/diffusers = {peaks['ours'] / peaks['diffusers']:.3f}" if peaks else ""
    print(f"step time ours/diffusers = {ours / theirs:.3f} (target <= 0.85){mem}")
    print(f"ours: fwd+bwd {1e3 * min(fb_times):.1f} ms, outside fwd+bwd (AdamW, zero_grad) "
          f"{100 * (ours - min(fb_times)) / ours:.1f}% of the step")


def main() -> None:
    args = parse_args()
    if args.memory_child:
        return memory_child(args)
    device = resolve_device(args.device, args.threads)
    args.device = device.type
    peak_flops = matmul_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"UNet train step (fwd + MSE + bwd + AdamW) on {name}; matmul peak {peak_flops / 1e12:.3f} TFLOP/s")
    for config in (CONFIGS if args.config == "both" else [args.config]):
        run(config, args, device, peak_flops)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["mini_sd", "tiny", "both"], default="both")
    p.add_argument("--batch", type=int, default=0, help="default: mini_sd 2 / tiny 16 on CPU, 32 / 128 on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=0, help="steps per timed repeat (default 10; mini_sd on CPU 1)")
    p.add_argument("--adamw", choices=["fused", "foreach", "loop"], default="fused", help="AdamW implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
