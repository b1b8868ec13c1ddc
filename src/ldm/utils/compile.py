"""Regional compilation: `torch.compile` each block of a backbone in place, with no block left to run eagerly.

Dynamo keeps one cache per *code object*, not per module: all 22 ResBlocks of the `base` UNet share
`ResBlock.forward`, and parameters get static shapes (`force_parameter_static_shapes`), so every distinct
parameter-shape signature (in/out widths, a skip conv or not) needs a graph of its own, and the feature maps' sizes
add one more when they first change. Past `torch._dynamo.config.recompile_limit` (8 by default) dynamo stops
compiling that function and the remaining blocks run eagerly, with a warning at most. That happened in the first
H200 ablation (2026-11-28, bench/gpu_runs/2026-11-28_h200/stage2_ablate.txt): the `base` UNet's ResBlocks come in
12 signatures. `compile_blocks` counts the signatures and raises the limit to cover them, so regional compilation
compiles every block whatever the widths, and a new latent size (an aspect bucket) reuses the graphs once sizes are
dynamic (tests/test_compile_regional.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn


def block_signature(block: nn.Module) -> tuple:
    """What dynamo specialises a block's graph on besides its inputs: the submodules' types and the parameters' shapes."""
    return (tuple((name, type(m).__name__) for name, m in block.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))


def recompile_limit_for(blocks: Iterable[nn.Module]) -> int:
    """A dynamo recompile limit that leaves no block eager: per forward function, two graphs per signature (static
    sizes first, then dynamic ones once a size changes) and room for a few size-dependent guards (the CPU
    convolution's, for one)."""
    signatures: dict[object, set[tuple]] = defaultdict(set)
    for block in blocks:
        signatures[type(block).forward].add(block_signature(block))
    return 2 * max((len(s) for s in signatures.values()), default=0) + 8


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor", **options: object) -> int:
    """`block.compile(backend=..., **options)` for each block, in place (parameter names and checkpoints unchanged),
    after raising dynamo's process-wide `recompile_limit` to `recompile_limit_for(blocks)` if it is lower. Returns
    the limit in force."""
    blocks = list(blocks)
    limit = max(torch._dynamo.config.recompile_limit, recompile_limit_for(blocks))
    torch._dynamo.config.recompile_limit = limit
    for block in blocks:
        block.compile(backend=backend, **options)
    return limit
