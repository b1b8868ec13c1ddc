"""Training-state memory per rank under `trainer=fsdp` (FSDP2-sharded UNet, `ldm.lightning.sharding.shard_backbone`)
against a DDP replica of the same UNet, in the same processes: bytes of parameters, gradients and AdamW state that
each rank holds after one real training step, and on CUDA the peak allocated memory of that step.

The state bytes are summed from the tensors themselves (a DTensor counts its local shard), so they show what
sharding saves before activations; the CUDA peak adds activations and the transient all-gathered blocks. Launch one
process per device with torchrun:

    python -m torch.distributed.run --nproc_per_node=2 bench/sharding_memory.py                     # CPU, gloo
    torchrun --nproc_per_node=8 bench/sharding_memory.py --device cuda --unet sd2 --resolution 64 --batch 4
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ldm.evaluation.distributed import init_from_env, rank_and_world
from ldm.lightning.sharding import shard_backbone

CONF = Path(__file__).resolve().parents[1] / "conf/model/backbone"


def local_bytes(tensors: Iterable[Tensor | None]) -> int:
    total = 0
    for t in tensors:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
    return total


def train_step(unet: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
               device: torch.device, context_dim: int) -> dict[str, float]:
    """One forward/backward/AdamW step on random latents; returns GiB per rank of each kind of training state."""
    g = torch.Generator(device="cpu").manual_seed(dist.get_rank())
    side = args.resolution // 8
    x = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    c_noise = torch.randn(args.batch, generator=g).to(device)
    context = torch.randn(args.batch, 77, context_dim, generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    module(x, c_noise, context).square().mean().backward()
    optimizer.step()
    gib = 2.0 ** 30
    out = {"params": local_bytes(unet.parameters()) / gib, "grads": local_bytes(p.grad for p in unet.parameters()) / gib,
           "adamw": local_bytes(v for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, Tensor)) / gib}
    out["total"] = sum(out.values())
    out["cuda_peak"] = torch.cuda.max_memory_allocated(device) / gib if device.type == "cuda" else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", default="base", help="a conf/model/backbone/unet_* preset (base: 156.8M, sd2: 865M)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resolution", type=int, default=64, help="image side in px (latents are side / 8)")
    parser.add_argument("--batch", type=int, default=1, help="per rank")
    args = parser.parse_args()

    torch.set_num_threads(1)
    device = init_from_env(args.device)
    rank, world = rank_and_world()
    if world < 2:
        parser.error("launch at least two processes: torchrun --nproc_per_node=2 bench/sharding_memory.py")
    cfg = OmegaConf.load(CONF / f"unet_{args.unet}.yaml")

    results = {}
    for kind in ("ddp", "fsdp"):
        torch.manual_seed(0)
        unet = instantiate(cfg).to(device)
        if kind == "ddp":
            module = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            module = shard_backbone(unet, init_device_mesh(device.type, (world,)))
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        results[kind] = train_step(unet, module, optimizer, args, device, cfg.context_dim)
        del module, unet, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()

    if rank == 0:
        params = sum(p.numel() for p in instantiate(cfg).parameters())
        print(f"UNet {args.unet} ({params / 1e6:.1f}M), {world} ranks on {args.device}, "
              f"{args.resolution} px, batch {args.batch} per rank; GiB per rank after one AdamW step")
        keys = ("params", "grads", "adamw", "total", "cuda_peak")
        print("| strategy | " + " | ".join(keys) + " |")
        print("| --- " * (len(keys) + 1) + "|")
        for kind, row in results.items():
            print(f"| {kind} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        print(f"fsdp / ddp training state: {results['fsdp']['total'] / results['ddp']['total']:.3f} "
              f"(ideal 1/{world} = {1 / world:.3f})")
        if device.type == "cuda":
            print(f"fsdp / ddp CUDA peak: {results['fsdp']['cuda_peak'] / results['ddp']['cuda_peak']:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
