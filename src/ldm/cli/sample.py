"""`python scripts/sample.py ckpt=PATH prompt="..."`: images from a stage-2 checkpoint or export, text-to-image,
img2img (image=, strength=) or inpainting (image=, mask=), with every setting written beside each PNG."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm.auto import tqdm

from ldm.conf import CONF_DIR
from ldm.inference.loading import load_pipeline
from ldm.inference.lora import add_lora
from ldm.inference.pipeline import DTYPES, LatentDiffusionPipeline
from ldm.inference.sampling_options import PRECISIONS, SamplingOptions
from ldm.utils.argv import quote_text_overrides
from ldm.utils.device import resolve_device
from ldm.utils.images import image_grid, to_uint8
from ldm.utils.logging import get_logger

log = get_logger(__name__)
TEXT_KEYS = ("prompt", "negative_prompt")  # free text: quoted for Hydra before it parses the command line


def read_prompts(prompt: str | Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from the command line (a string or a list) and/or a file of one prompt per line."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={prompts_file} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError('No prompt: pass prompt="..." (or prompt=[a,b]) or prompts_file=<one prompt per line>.')
    return [str(p) for p in prompts]


def load_image(path: str, mode: str = "RGB") -> Tensor:
    """An image file as (1, C, H, W): RGB in [-1, 1], or a mask ("L") in [0, 1]."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read") from None
    t = torch.from_numpy(array)
    return (t[None, None] if mode == "L" else t.permute(2, 0, 1)[None] * 2 - 1).contiguous()


def _slug(text: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:n].strip("_") or "empty"


def run(cfg: DictConfig) -> list[Path]:
    """Generate, write PNG + json per image and a grid; returns the written PNGs (NaN images are not written)."""
    prompts = read_prompts(OmegaConf.to_object(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else cfg.prompt,
                           cfg.prompts_file)
    if cfg.num_images < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {cfg.num_images} and {cfg.batch_size}")
    options = SamplingOptions.from_config(cfg)  # a wrong sampler, option or interval fails before the model loads
    weights_dtype = cfg.get("weights_dtype") or "fp32"
    if weights_dtype not in PRECISIONS:
        raise ValueError(f"weights_dtype must be one of {PRECISIONS}, got {weights_dtype!r}")
    device = resolve_device(cfg.device)
    pipeline = load_pipeline(cfg.ckpt, ema=cfg.ema, config=cfg.config, autoencoder=cfg.autoencoder, device=device)
    if cfg.get("lora"):
        add_lora(pipeline, cfg.lora, float(cfg.lora_scale))
    pipeline.cast_weights(DTYPES[weights_dtype])  # after the LoRA merge, which adds in float32
    image = load_image(cfg.image) if cfg.image else None
    mask = load_image(cfg.mask, "L") if cfg.mask else None
    if mask is not None and image is None:
        raise ValueError("mask= needs image= (the picture whose unmasked part is kept)")
    strength = 1.0  # text-to-image; with an image: the given strength, else 0.75 (img2img) or 1.0 (inpainting)
    if image is not None:
        strength = cfg.strength if cfg.strength is not None else 1.0 if mask is not None else 0.75
    if cfg.get("aspect") and image is None and (cfg.height or cfg.width):
        raise ValueError("give aspect= or height=/width=, not both")
    if image is not None:
        height, width = image.shape[-2:]
    elif cfg.get("aspect"):
        height, width = pipeline.aspect_size(str(cfg.aspect))
    else:
        height, width = cfg.height or pipeline.default_size, cfg.width or pipeline.default_size
    pipeline.check_size(int(height), int(width))

    jobs = [(p, cfg.seed + j) for j, p in enumerate(p for p in prompts for _ in range(cfg.num_images))]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, images, failed = [], [], []
    steps = max(1, int(options.steps * strength)) if image is not None else options.steps  # per batch
    # One bar for the whole run, left on screen when done, so that later log lines start on a line of their own.
    bar = tqdm(total=steps * math.ceil(len(jobs) / cfg.batch_size), desc=f"sampling {len(jobs)} images",
               unit="step")
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        result = _generate(pipeline, cfg, options, [p for p, _ in batch], [s for _, s in batch], image, mask,
                           strength, int(height), int(width), bar)
        for k, (prompt, seed) in enumerate(batch):
            index = start + k
            if not result.finite[k]:
                failed.append(f"#{index} (prompt {prompt!r}, seed {seed})")
                images.append(torch.full_like(result.images[k].cpu(), -1.0))  # a black placeholder
                continue
            images.append(result.images[k].cpu())
            path = out / f"{index:05d}_{_slug(prompt)}_s{seed}.png"
            Image.fromarray(to_uint8(result.images[k]).permute(1, 2, 0).numpy()).save(path)
            path.with_suffix(".json").write_text(json.dumps(_record(cfg, options, pipeline, prompt, seed, height,
                                                                    width, strength), indent=2))
            written.append(path)
    bar.close()
    image_grid(torch.stack(images), nrow=cfg.grid_rows or cfg.num_images).save(out / "grid.png")
    log.info(f"Wrote {len(written)} images, their json settings and grid.png to {out}")
    if failed:
        raise FloatingPointError(f"{len(failed)} of {len(jobs)} samples contain NaN/Inf values and were not written "
                                 f"(black in grid.png): {', '.join(failed[:5])}. Try precision=fp32, fewer steps "
                                 "of a stochastic sampler, or check the checkpoint for NaN weights.")
    return written


def _generate(pipeline: LatentDiffusionPipeline, cfg: DictConfig, options: SamplingOptions, prompts: list[str],
              seeds: list[int], image: Tensor | None, mask: Tensor | None, strength: float, height: int, width: int,
              bar: tqdm) -> Any:
    return pipeline.generate(
        prompts, seeds, negative_prompt=cfg.negative_prompt, height=height, width=width, image=image,
        strength=strength, mask=mask, repaint=cfg.repaint, callback=lambda *_: bar.update(1),
        **options.generate_kwargs())


def _record(cfg: DictConfig, options: SamplingOptions, pipeline: LatentDiffusionPipeline, prompt: str, seed: int,
            height: int, width: int, strength: float) -> dict[str, Any]:
    """Every setting that reproduces one image: `python scripts/sample.py` with these keys and num_images=1."""
    record = {"prompt": prompt, "seed": seed, "negative_prompt": cfg.negative_prompt, **options.record(),
              "height": int(height), "width": int(width), "ckpt": str(Path(cfg.ckpt).resolve()),
              "weights": pipeline.weights, "ema": cfg.ema, "config": cfg.config, "autoencoder": cfg.autoencoder,
              "weights_dtype": cfg.get("weights_dtype") or "fp32"}
    if cfg.get("lora"):
        record.update(lora=str(Path(cfg.lora).resolve()), lora_scale=float(cfg.lora_scale))
    if cfg.image:
        record.update(image=str(Path(cfg.image).resolve()), strength=strength)
    if cfg.mask:
        record.update(mask=str(Path(cfg.mask).resolve()), repaint=cfg.repaint)
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """`prompt=a circle, on blue` reaches the config verbatim: the shell has dropped the user's quotes, so
    `prompt=`/`negative_prompt=` values are quoted for Hydra's grammar first (lists `[a,b]` are kept)."""
    sys.argv[1:] = quote_text_overrides(sys.argv[1:], TEXT_KEYS)
    _main()


if __name__ == "__main__":
    main()
