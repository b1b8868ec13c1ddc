"""Splitting an evaluation over the processes of a torchrun launch: rank r takes samples r, r + W, r + 2W, ... and
the per-sample results come back in the global order, so every metric is the same at any number of ranks."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and pick this rank's device ("auto": its GPU
    when there is one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def gather_rows(rows: Tensor, total: int) -> Tensor:
    """All ranks' rows (rank r holds global rows r, r + W, ...) as one (total, ...) CPU tensor, in global order."""
    rank, world = rank_and_world()
    if world == 1:
        return rows.cpu()
    per_rank = math.ceil(total / world)
    if len(rows) != len(range(rank, total, world)):
        raise RuntimeError(f"rank {rank} holds {len(rows)} rows, expected {len(range(rank, total, world))}")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(per_rank, *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # parts[r][i] is global row i * W + r: interleave by stacking along a new rank axis.
    return torch.stack(parts, dim=1).reshape(per_rank * world, *rows.shape[1:])[:total].cpu()


def sum_over_ranks(value: int) -> int:
    """An integer summed over all ranks (itself without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], device=device)
    dist.all_reduce(total)
    return int(total.item())
