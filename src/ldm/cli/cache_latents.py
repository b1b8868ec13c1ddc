"""`python scripts/cache_latents.py autoencoder=... source=... out=... resolution=... [text_encoder=...]`: image shards ->
latent shards (see `ldm.data.latent_cache`), with the captions' text-encoder states if asked, split over the processes
of a torchrun / srun launch."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.conf import CONF_DIR
from ldm.data.buckets import resolve_buckets
from ldm.data.latent_cache import cache_latents
from ldm.models.autoencoder.export import load_autoencoder
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.utils.device import resolve_device
from ldm.utils.logging import get_logger

log = get_logger(__name__)
SPLITS = ("train", "val")


def launch_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's or SLURM's environment; (0, 1) for a plain launch."""
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and size_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return 0, 1


def build_text_encoder(spec: str | None, pretrained: str | None = None) -> OpenCLIPTextEncoder | None:
    """The frozen text encoder whose states to cache: a `model/text_encoder` config name (openclip_vit_h14, ...) or a
    .yaml path, its `pretrained` replaced when given (a local weights file, offline); None for no text states."""
    if not spec:
        return None
    group = Path(CONF_DIR) / "model" / "text_encoder"
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else group / f"{spec}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        raise FileNotFoundError(f"text_encoder={spec}: no such config; give one of {names} or a .yaml path")
    cfg = OmegaConf.load(path)
    if pretrained is not None:
        cfg.pretrained = pretrained
    if not cfg.get("freeze", True):
        raise ValueError(f"text_encoder={spec} trains its encoder (freeze=false): only a frozen one's states can be "
                         "cached")
    return instantiate(cfg, cache_size=0)


def run(cfg: DictConfig) -> None:
    rank, world_size = launch_rank()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world_size > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be float32 or float16, got {cfg.dtype!r}")
    text_encoder = build_text_encoder(cfg.get("text_encoder"), cfg.get("text_encoder_pretrained"))
    if text_encoder is not None:
        text_encoder = text_encoder.to(device)
    autoencoder = load_autoencoder(cfg.autoencoder).eval().to(device)
    source = Path(str(cfg.source))
    splits = [s for s in SPLITS if (source / s).is_dir()] if source.is_dir() else []
    jobs = [(str(source / s), Path(cfg.out) / s) for s in splits] or [(cfg.source, Path(cfg.out))]
    buckets = resolve_buckets(cfg.buckets, cfg.resolution, cfg.bucket_multiple, cfg.bucket_max_ratio)
    for src, out in jobs:
        summary = cache_latents(autoencoder, src, out, resolution=cfg.resolution, batch_size=cfg.batch_size,
                                rank=rank, world_size=world_size, dtype=dtype,
                                buckets=None if out.name == "val" else buckets,  # validation stays square
                                text_encoder=text_encoder)
        skipped = ", ".join(f"{k} {v}" for k, v in summary.skipped.items()) or "none"
        log.info(f"[rank {rank}] {out}: {summary.samples} samples in {len(summary.written)} new shards, "
                 f"{len(summary.resumed)} already done; skipped: {skipped}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="cache_latents")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
