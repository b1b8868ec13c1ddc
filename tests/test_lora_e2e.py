"""LoRA through the entry points: `train.py experiment=lora_tiny` from the session's tiny stage-2 run, then
`scripts/export_lora.py` (adapter folder, and merge=true) and `scripts/sample.py lora=...`: the base model plus the
adapter, the LoRA run's own checkpoint and the merged export give the same images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_train
from safetensors.torch import load_file

from ldm.inference.loading import backbone_weights, load_pipeline
from ldm.inference.lora import add_lora
from ldm.models.lora import weights_sha256

pytestmark = pytest.mark.slow  # the session's tiny stage-1 + stage-2 runs, and a LoRA run of 4 steps


@pytest.fixture(scope="module")
def lora_run(stage2_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("lora_run")
    run_train("experiment=lora_tiny", "data=latents", f"data.root={stage2_runs['latents']}",
              f"model.autoencoder.path={stage2_runs['ae']}/export", f"model.init_from={stage2_runs['ckpt']}",
              f"hydra.run.dir={run}", f"paths.log_dir={run.parent}", "data.batch_size=16", "trainer.max_steps=4",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "model.lr_scheduler.warmup_steps=1",
              "callbacks=[default,ema]", "callbacks.model_checkpoint.every_n_train_steps=2", "num_threads=1",
              "logger=none", "model.lora.init=random")  # B random: the adapter shows in the images from step 0
    return run / "checkpoints" / "last.ckpt"


def generate(pipeline) -> torch.Tensor:
    return pipeline.generate(["a red circle"], [3], steps=4, guidance=2.0).images


def test_export_then_sample_base_plus_adapter_equals_the_run(lora_run: Path, stage2_runs: dict[str, Path],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              one_thread) -> None:
    from ldm.cli.export_lora import main as export_main

    export_main([f"ckpt={lora_run}", f"out={tmp_path / 'adapter'}"])
    tensors = load_file(str(tmp_path / "adapter" / "lora.safetensors"))
    card = json.loads((tmp_path / "adapter" / "lora.json").read_text())
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert card["lora"]["rank"] == 8 and card["weights"].startswith("ema")
    # trained on the base run's EMA weights (init_from's default), and the card says which
    assert card["base_sha256"] == weights_sha256(backbone_weights(stage2_runs["ckpt"])[0])

    run, base = load_pipeline(lora_run), load_pipeline(stage2_runs["ckpt"])  # the run's checkpoint: merged on load
    added = add_lora(load_pipeline(stage2_runs["ckpt"]), tmp_path / "adapter")
    merged = (export_main([f"ckpt={lora_run}", f"out={tmp_path / 'merged'}", "merge=true"]),
              load_pipeline(tmp_path / "merged"))[1]
    run_w, base_w = run.backbone.state_dict(), base.backbone.state_dict()
    assert max((run_w[k] - v).abs().max() for k, v in base_w.items()) > 0.01  # the adapter moves weights
    for other in (added, merged):
        assert all(torch.allclose(v, run_w[k], atol=1e-6) for k, v in other.backbone.state_dict().items())
    # A 6-step base model's attention branches are still near their zero-initialised outputs, so images move little:
    # compare them far below 1/255.
    run_images, base_images = generate(run), generate(base)
    assert (run_images - base_images).abs().max() > 5e-4
    assert (generate(added) - run_images).abs().max() <= 1e-4
    assert (generate(merged) - run_images).abs().max() <= 1e-4
    unscaled = add_lora(load_pipeline(stage2_runs["ckpt"]), tmp_path / "adapter", scale=0.0)
    assert torch.equal(generate(unscaled), base_images)  # scale 0: the base model

    from ldm.cli.sample import main as sample_main

    monkeypatch.setattr(sys, "argv", ["sample.py", f"ckpt={stage2_runs['ckpt']}", "prompt=a red circle",
                                      f"lora={tmp_path / 'adapter'}", "lora_scale=0.5", "num_images=1", "steps=2",
                                      "device=cpu", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}"])
    sample_main()
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert record["lora_scale"] == 0.5 and "LoRA" in record["weights"]


def test_export_of_a_run_without_lora_is_refused(stage2_runs: dict[str, Path], tmp_path: Path) -> None:
    from ldm.cli.export_lora import main as export_main

    with pytest.raises(ValueError, match="is not a LoRA run .*model/lora=default"):
        export_main([f"ckpt={stage2_runs['ckpt']}", f"out={tmp_path}"])


def test_the_diffusers_export_of_a_run_adds_the_same_weight_deltas_in_diffusers(
        lora_run: Path, stage2_runs: dict[str, Path], tmp_path: Path, one_thread) -> None:
    """format=diffusers, read by diffusers' loader into a UNet2DConditionModel twin of unet_tiny: its merged weight
    changes, renamed by the diffusers -> ours converter, are the run's (merged LoRA run minus its base)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ldm.cli.export_lora import main as export_main
    from ldm.models.unet.convert import convert_diffusers_unet, unet_kwargs_from_diffusers_config

    export_main([f"ckpt={lora_run}", f"out={tmp_path / 'diffusers'}", "format=diffusers"])
    run, base = load_pipeline(lora_run).backbone, load_pipeline(stage2_runs["ckpt"]).backbone
    theirs = UNet2DConditionModel(  # unet_tiny at the quickstart's 16 latent channels: 16-channel heads
        in_channels=16, out_channels=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        use_linear_projection=True, norm_num_groups=8, cross_attention_dim=64, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    kwargs = unet_kwargs_from_diffusers_config(theirs.config)
    assert all(tuple(v) == tuple(run.config[k]) if isinstance(v, tuple | list) else v == run.config[k]
               for k, v in kwargs.items())
    before = {k: v.clone() for k, v in convert_diffusers_unet(theirs.state_dict()).items()}  # merge() is in place
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "diffusers"))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=theirs)
    for module in theirs.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    after = convert_diffusers_unet({k.replace(".base_layer.", "."): v for k, v in theirs.state_dict().items()
                                    if ".lora_" not in k})
    ours_run, ours_base = run.state_dict(), base.state_dict()
    changed = [k for k in ours_run if not torch.equal(ours_run[k], ours_base[k])]
    assert changed and all(".attn" in k for k in changed)  # lora_tiny adapts attention only
    for k in ours_run:
        torch.testing.assert_close(after[k] - before[k], ours_run[k] - ours_base[k], atol=1e-6, rtol=0, msg=k)
