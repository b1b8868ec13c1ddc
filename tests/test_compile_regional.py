"""Regional compilation (`compile_backbone=blocks`) does not recompile across aspect-ratio buckets and resolutions
(issue 15): after one recompile that makes the sizes dynamic, new latent sizes reuse the compiled graphs, and blocks
of the same kind share them (no per-instance recompiles that would hit dynamo's cache limit and fall back to
eager). Counted with dynamo's CompileCounter backend (graph capture only, no code generation)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch._dynamo.testing import CompileCounter

from ldm.models.backbone import Conditioning

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_new_latent_sizes_reuse_the_compiled_blocks(name: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = instantiate(OmegaConf.load(f"{CONF_DIR}/model/backbone/{name}.yaml"), context_dim=64)
    counter = CompileCounter()
    for block in backbone.blocks():
        block.compile(backend=counter)
    blocks = len(backbone.blocks())
    frames = []
    for h, w in [(8, 8), (8, 12), (12, 8), (16, 16), (8, 16)]:  # a square size, then buckets and a larger size
        x = torch.randn(2, backbone.in_channels, h, w)
        cond = Conditioning(torch.randn(2, 77, 64), None, torch.ones(2, 77, dtype=torch.bool))
        out = backbone(x, torch.tensor([10.0, 500.0]), cond)
        assert out.shape[-2:] == (h, w)
        frames.append(counter.frame_count)
    assert frames[2:] == [frames[1]] * 3, frames  # no compile after the first change of size
    assert frames[1] - frames[0] <= frames[0] < blocks, frames  # blocks of the same shapes share their graphs
