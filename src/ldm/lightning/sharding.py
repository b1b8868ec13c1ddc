"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`) for backbones whose weights,
gradients and optimizer state do not fit one GPU beside the activations.

Why not Lightning's `FSDPStrategy`: it wraps the whole LightningModule in FSDP1, whose flat parameters make the
UNet's own parameters unusable outside the root forward (the EMA, sampling and evaluation callbacks call
`pl_module.backbone` directly) and which refuses to run without CUDA, so nothing of it could be tested on CPU.
FSDP2 keeps every parameter a `DTensor` under its own name, so the EMA is elementwise per shard, checkpoints keep
the plain backbone's keys, and the same code path runs on CPU with gloo (`trainer=fsdp_cpu`) in the tests.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.models.backbone import Backbone


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with every process in one data-parallel group (no tensor parallelism), writing
    one full checkpoint file by default, like the other strategies, so that `sample.py`, `evaluate.py` and
    resumes with another number of GPUs read it unchanged. The LightningModule shards itself in
    `configure_model` over `device_mesh["data_parallel"]`."""

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the number of nodes (it expects tensor parallelism
        # inside a node); here every process is a data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_backbone(backbone: Backbone, mesh: DeviceMesh, reshard_after_forward: bool = True) -> Backbone:
    """Shard `backbone` in place: each of its `blocks()` is its own unit (its weights are gathered just for its
    forward and backward), the remaining layers (stem, embeddings, resamplers, head) form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in backbone.blocks():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return backbone


def is_sharded(module: nn.Module) -> bool:
    """True when any of the module's parameters is a DTensor (sharded by `fully_shard`)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor is gathered from every rank (a collective: all ranks must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copy a whole (unsharded) tensor into `target`; a DTensor target takes this rank's shard of it."""
    if isinstance(target, DTensor):
        full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    target.copy_(full)
