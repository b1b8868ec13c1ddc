"""Training-step throughput and peak memory of our `kl_f8_c4` AutoencoderKL against diffusers' (same geometry,
same weights): forward, L1 + KL, backward and an AdamW step, fp32 on CPU or bf16 autocast on CUDA.

Timing: both models live in one process and run alternately, `--steps` steps per repeat; the best repeat counts.
Memory: on CUDA, `max_memory_allocated` during a repeat minus what was allocated before it (activations,
gradients, optimizer temporaries; weights and AdamW states are reported separately as "resident"). On CPU
tracemalloc cannot see torch's allocations, so each contender runs once more in a fresh subprocess: after one
warm-up step (AdamW states, gradients) it returns freed heap to the OS (`malloc_trim`; the child also runs with
a fixed glibc mmap threshold so large tensors are unmapped when freed), resets the kernel's RSS high-water
mark (`/proc/self/clear_refs`), runs a step and reports peak RSS (VmHWM) minus the RSS before it.

    python bench/autoencoder_step.py                       # CPU: 64 px, batch 2
    python bench/autoencoder_step.py --resolution 256 --batch-size 8   # the defaults on CUDA
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

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldm.models.autoencoder.convert import (
    autoencoder_kwargs_from_diffusers_config,
    convert_diffusers_autoencoder,
)
from ldm.models.autoencoder.kl import PRESETS, AutoencoderKL

DIFFUSERS_KL_F8_C4 = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def build(device: torch.device) -> dict[str, torch.nn.Module]:
    """Both contenders with identical weights; asserts the geometry and parameter count agree."""
    torch.manual_seed(0)
    theirs = DiffusersAutoencoderKL(**DIFFUSERS_KL_F8_C4)
    kwargs = autoencoder_kwargs_from_diffusers_config(theirs.config)
    assert {k: kwargs[k] for k in PRESETS["kl_f8_c4"]} == PRESETS["kl_f8_c4"], kwargs
    ours = AutoencoderKL(**kwargs)
    ours.load_state_dict(convert_diffusers_autoencoder(theirs.state_dict()), strict=True)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
    return {"ours": ours.to(device).train(), "diffusers": theirs.to(device).train()}


def make_step(name: str, model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        if name == "ours":
            recon, posterior = model(x)
            return recon, posterior.kl()
        posterior = model.encode(x).latent_dist
        return model.decode(posterior.sample()).sample, posterior.kl()

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            recon, kl = forward()
            loss = (recon.float() - x).abs().mean() + 1e-6 * kl.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_repeat(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per step and, on CUDA, peak MiB above what was allocated before the repeat."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def memory_child(args: argparse.Namespace) -> None:
    """Fresh process: build both (same imports and weights as the timing run), print one step's peak RSS delta."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    models = build(device)
    name = args.memory_child
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    step = make_step(name, models[name], x, autocast=False)
    del models
    step()  # allocates gradients and AdamW states, which count as resident
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else the warm-up's freed activations hide in "before"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = proc_status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": proc_status_mib("VmHWM") - before}))


def cpu_peak_mib(name: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--memory-child", name, "--resolution", str(args.resolution),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    # A fixed threshold stops glibc from raising it after the first large frees and then keeping big tensors
    # on the heap, where freed memory still counts as resident.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    args = parse_args()
    if args.memory_child:
        return memory_child(args)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    resolution = args.resolution or (256 if cuda else 64)
    batch = args.batch_size or (8 if cuda else 2)
    steps = args.steps or (10 if cuda else 3)
    args.resolution, args.batch_size = resolution, batch
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)

    models = build(device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    resident = {n: sum(t.numel() * t.element_size() for t in m.parameters()) * 3 / 2**20 for n, m in models.items()}
    steps_fn = {n: make_step(n, m, x, autocast=cuda) for n, m in models.items()}
    for fn in steps_fn.values():  # warm-up: kernels, cudnn autotuning, AdamW state allocation
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in models}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in steps_fn.items():  # alternate, so drifts (clocks, other load) hit both alike
            seconds, peak = timed_repeat(fn, steps, device)
            times[name].append(seconds)
            if peak is not None:
                peaks[name] = max(peaks.get(name, 0.0), peak)
    if not cuda and not args.no_memory:
        del models, steps_fn
        peaks = {name: cpu_peak_mib(name, args) for name in times}

    precision = "bf16 autocast" if cuda else f"fp32, {args.threads} threads"
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"kl_f8_c4 train step (fwd + L1/KL + bwd + AdamW) on {device_name}, {precision}, "
          f"batch {batch} x {resolution}px, best of {args.repeats} x {steps} steps")
    print(f"{'model':<10} {'img/s best':>10} {'img/s med':>10} {'ms/step':>9} {'peak MiB':>9} {'resident MiB':>13}")
    for name, ts in times.items():
        peak = f"{peaks[name]:9.0f}" if name in peaks else f"{'-':>9}"
        print(f"{name:<10} {batch / min(ts):10.2f} {batch / statistics.median(ts):10.2f} "
              f"{1e3 * min(ts):9.1f} {peak} {resident[name]:13.0f}")
    ratio = min(times["diffusers"]) / min(times["ours"])
    mem = f", peak memory ours/diffusers = {peaks['ours'] / peaks['diffusers']:.3f}" if peaks else ""
    print(f"throughput ours/diffusers = {ratio:.3f}{mem}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=0, help="image size (default 256 on CUDA, 64 on CPU)")
    p.add_argument("--batch-size", type=int, default=0, help="default 8 on CUDA, 2 on CPU")
    p.add_argument("--steps", type=int, default=0, help="steps per timed repeat (default 10 CUDA, 3 CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
