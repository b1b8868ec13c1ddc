"""How much of a full stage-2 Lightning training step is spent outside forward and backward.

A full step (Trainer with EMA, gradient clipping, logging, AdamW, the NaN guard, in-memory data) is timed
against the bare forward + backward of the same DiffusionModule on the same batches, in the same process,
alternating the two, best of several repeats. The target is <= 10% outside forward and backward.

    python bench/stage2_overhead.py                 # tiny parts, CPU (UNet, v-prediction)
    python bench/stage2_overhead.py --backbone dit  # the tiny DiT with rectified flow (conf/model/backbone/dit_tiny)
    python bench/stage2_overhead.py --device cuda   # bf16 autocast
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from ldm.callbacks.ema import EMA
from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.noise_levels import LogitNormalTimesteps
from ldm.diffusion.parameterization import FlowPrediction, VPrediction
from ldm.diffusion.process import DiffusionProcess
from ldm.diffusion.schedules import RectifiedFlow, ScaledLinearSchedule
from ldm.diffusion.weighting import MinSNR
from ldm.lightning.diffusion_module import DiffusionModule
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.models.unet.unet import UNet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "backbone"
CAPTIONS = ["a small red triangle on a blue background", "a large green circle on a white background"]


def build(device: str, backbone: str = "unet") -> DiffusionModule:
    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                       mid_attention=False, norm_groups=8)
    ae.set_latent_stats(0.5, torch.zeros(4), torch.ones(4))
    if backbone == "dit":  # conf/model/backbone/dit_tiny.yaml, rectified flow as experiment=dit_tiny
        net = instantiate(OmegaConf.load(CONF / "dit_tiny.yaml"))
        process = DiffusionProcess(RectifiedFlow(), FlowPrediction())
        loss = DenoisingLoss(noise_levels=LogitNormalTimesteps())
    else:
        net = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(0, 1), num_heads=None, head_channels=16, context_dim=64, norm_groups=8)
        schedule = ScaledLinearSchedule()
        process, loss = DiffusionProcess(schedule, VPrediction(schedule)), DenoisingLoss(weighting=MinSNR(5.0))
    return DiffusionModule(backbone=net, process=process,
                           text_encoder=OpenCLIPTextEncoder("ldm-tiny-text", pretrained=None),
                           autoencoder=ae, loss=loss, optimizer=partial(torch.optim.AdamW, lr=1e-4, fused=True)).to(device)


def batches(n: int, batch: int, resolution: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
             "caption": [CAPTIONS[i % 2] for i in range(batch)]} for _ in range(n)]


class StepTimer(L.Callback):
    def __init__(self, device: str) -> None:
        self.device, self.times, self._t = device, [], 0.0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args) -> None:
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t)


def full_steps(module: DiffusionModule, data: list[dict], device: str, precision: str, tmp: str) -> float:
    timer = StepTimer(device)
    trainer = L.Trainer(max_epochs=1, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        precision=precision, gradient_clip_val=1.0, log_every_n_steps=1,
                        logger=CSVLogger(tmp, name="bench"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EMA(attribute="backbone", decay=0.999), timer])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return min(timer.times[2:])  # the first steps build optimizer state and the EMA copy


def bare_steps(module: DiffusionModule, data: list[dict], device: str, precision: str) -> float:
    module.train()
    times = []
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    for batch in data:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            z = module.encode_images(batch["image"].to(device))
            context, _ = module.embed_captions(batch["caption"], module.cond_drop_prob)
            loss = module.loss(module.backbone, z, context).loss.mean()
        loss.backward()
        module.backbone.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import tempfile

    precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"
    module = build(args.device, args.backbone)
    data = batches(args.steps, args.batch, args.resolution)
    full, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternate the two, keep the best of each
            bare.append(bare_steps(module, data, args.device, precision))
            full.append(full_steps(module, data, args.device, precision, tmp))
    f, b = min(full), min(bare)
    print(f"stage-2 step, tiny parts ({args.backbone}), batch {args.batch} at {args.resolution} px, {args.device}, "
          f"{precision}")
    print(f"forward+backward {b * 1e3:8.1f} ms   full Lightning step {f * 1e3:8.1f} ms   "
          f"outside forward+backward {(f - b) / f:6.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
