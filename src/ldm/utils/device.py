"""`device=auto` for scripts and benchmarks: the GPU when there is one, with its fast paths switched on."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto", threads: int | None = None) -> torch.device:
    """"auto" -> cuda when available, else cpu. On CUDA enable cuDNN autotuning and TF32 matmuls (what training
    uses); on the CPU set `threads` intra-op threads when given."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    elif threads:
        torch.set_num_threads(threads)
    return device
