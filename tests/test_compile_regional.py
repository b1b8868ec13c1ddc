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
from ldm.utils.compile import compile_blocks, recompile_limit_for

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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet_base", "unet_sd15", "dit_b2", "mmdit_base"])
def test_every_block_of_the_real_backbones_is_compiled(name: str) -> None:
    """The `base` and SD 1.5 UNets' ResBlocks come in 12 and more parameter-shape signatures sharing one forward, past
    dynamo's default recompile limit of 8: plain `block.compile()` leaves the rest eager (dynamo raises here, where
    it would warn once in a run), `compile_blocks` compiles every one, at every latent size. The transformers' blocks
    are alike and stay within the default, and the same holds for them after compile_blocks."""
    torch.manual_seed(0)
    backbone = instantiate(OmegaConf.load(f"{CONF_DIR}/model/backbone/{name}.yaml"))
    pooled = torch.randn(1, backbone.pooled_dim) if backbone.pooled_dim else None
    cond = Conditioning(torch.randn(1, 77, backbone.context_dim), pooled, torch.ones(1, 77, dtype=torch.bool))

    def run(sizes: list[tuple[int, int]]) -> None:
        for h, w in sizes:
            backbone(torch.randn(1, backbone.in_channels, h, w), torch.tensor([10.0]), cond)

    before = torch._dynamo.config.recompile_limit  # process-wide: an earlier compile_blocks may have raised it
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        torch._dynamo.reset()
        for block in backbone.blocks():
            block.compile(backend=CompileCounter())
        if name.startswith("unet"):
            with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                run([(16, 16)])

        torch._dynamo.reset()
        counter = CompileCounter()
        limit = compile_blocks(backbone.blocks(), backend=counter)
        assert limit > 8
        s = 2 * backbone.size_multiple  # no size 1 anywhere: dynamo specialises on it
        run([(s, s), (s, 2 * s), (2 * s, 2 * s)])  # raises if any block falls back to eager
        frames = counter.frame_count
        run([(2 * s, s), (s, s)])
        assert counter.frame_count == frames  # sizes seen in any order: no new graphs
    assert torch._dynamo.config.recompile_limit == before  # the patch restored the process-wide value


def test_recompile_limit_counts_the_signatures_per_forward() -> None:
    backbone = instantiate(OmegaConf.load(f"{CONF_DIR}/model/backbone/unet_base.yaml"))
    blocks = backbone.blocks()
    res = [b for b in blocks if type(b).__name__ == "ResBlock"]
    widths = {(b.conv1.in_channels, b.conv1.out_channels) for b in res}  # the skip conv follows from the widths
    assert len(widths) == 12
    assert recompile_limit_for(blocks) == 2 * 12 + 8
    assert recompile_limit_for(blocks[:1]) == 2 + 8


@pytest.mark.parametrize(("how", "mode"), [("blocks", "reduce-overhead"), ("full", "max-autotune"), ("blocks", None)])
def test_the_compile_mode_reaches_every_compiled_module(how: str, mode: str | None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from functools import partial

    from test_diffusion_module import parts

    from ldm.diffusion.losses import DenoisingLoss
    from ldm.diffusion.parameterization import VPrediction
    from ldm.diffusion.process import DiffusionProcess
    from ldm.diffusion.schedules import CosineSchedule
    from ldm.lightning.diffusion_module import DiffusionModule

    calls: list[tuple[type, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self), kw)))
    ae, unet, text = parts()
    schedule = CosineSchedule()
    DiffusionModule(backbone=unet, text_encoder=text, autoencoder=ae, process=DiffusionProcess(
        schedule, VPrediction(schedule)), loss=DenoisingLoss(), optimizer=partial(torch.optim.AdamW),
        compile_backbone=how, compile_mode=mode)
    expected = [type(b) for b in unet.blocks()] if how == "blocks" else [type(unet)]
    assert [c for c, _ in calls] == expected
    assert all(kw == {"backend": "inductor", **({"mode": mode} if mode else {})} for _, kw in calls)
