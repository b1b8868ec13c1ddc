"""Model FLOPs counted by torch's `FlopCounterMode`, with the CPU attention kernels it does not know (the same
formulas as its CUDA ones), and the dense bf16 peak of known GPUs for model-FLOPs utilisation (MFU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
CPU_SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v),
}

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first name contained in the device's
# name wins (so "H100 PCIe" precedes "H100"). An 8192^3 bf16 matmul reaches ~790 of the H100/H200's 989.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0,
                    "RTX 6000 Ada": 364.0, "V100": 125.0}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything `fn` runs (forward, and backward if it runs one)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, or a GPU not in `BF16_PEAK_TFLOPS`)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
