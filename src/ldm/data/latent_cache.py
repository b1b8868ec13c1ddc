"""Latent shards: the frozen autoencoder's posterior (mean, std) of every image in image-text shards, computed once
so that stage 2 does not re-encode each image every epoch (Rombach et al. 2022 train on such caches too), and
optionally the frozen text encoder's states of every caption, so that stage 2 runs no text encoder either.

One latent shard per source shard, same file name, same keys, same img2dataset `_stats.json`, so the sharded loader
reads them unchanged. `latent_cache.json` in the cache folder records the autoencoder's identity (a hash of its
weights, which include the latent statistics) and the resolution, and the text encoder's (hash, layer, context) when
text states are cached; training refuses a cache made with another autoencoder or text encoder.

Text states are big: ViT-H-14's 77 x 1024 token states are 158 KiB per sample in float16 (10x a 32x32x4 posterior),
so they suit fine-tuning sets (100k samples: 15 GiB), not web-scale pre-training, where the text forward (about a
sixth of an eager `ldm_256` step on an H200) is better paid each step. SimpleTuner caches them the same way.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.data.shards import expand_urls, stats_path, write_shard
from ldm.data.webdataset import LATENT_EXTENSION, TEXT_EXTENSIONS, ShardLoader
from ldm.models.autoencoder.export import weights_hash
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder

CARD = "latent_cache.json"


@dataclass
class CacheSummary:
    written: list[Path] = field(default_factory=list)
    resumed: list[Path] = field(default_factory=list)  # already complete from an earlier run: left as they are
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)


def cache_identity(autoencoder: AutoencoderKL, resolution: int) -> dict[str, Any]:
    """What a cache must agree on with the model that trains from it."""
    return {"autoencoder_sha256": weights_hash(autoencoder), "resolution": int(resolution),
            "latent_channels": autoencoder.latent_channels, "downsample_factor": autoencoder.downsample_factor}


def text_identity(text_encoder: OpenCLIPTextEncoder) -> dict[str, Any]:
    """What cached text states must agree on with the text encoder of the model that trains from them."""
    return {"text_encoder_sha256": weights_hash(text_encoder), "model_name": text_encoder.model_name,
            "layer": text_encoder.layer, "context_length": text_encoder.context_length, "width": text_encoder.width}


def check_text_cache(recorded: dict[str, Any], text_encoder: OpenCLIPTextEncoder,
                     where: str = "the latent cache") -> None:
    """Refuse cached text states (`recorded`: the card's "text_encoder") that this model's text encoder would not give:
    another encoder, layer or context, or one that trains (its states change every step)."""
    hint = "or train without them: data.text_states=false"
    if not text_encoder.freeze:
        raise ValueError(f"{where} holds text-encoder states, but this run trains its text encoder (freeze=false), "
                         f"whose states change every step: {hint}.")
    mine = text_identity(text_encoder)
    if recorded != mine:
        diff = {k: (recorded.get(k), v) for k, v in mine.items() if recorded.get(k) != v}
        raise ValueError(f"{where} holds the states of another text encoder than this model's ({diff}, as (cached, "
                         f"this model)): re-cache with this text encoder (scripts/cache_latents.py "
                         f"text_encoder=...), {hint}.")


def read_card(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} has no {CARD}: not a latent cache. Write one with "
                                "python scripts/cache_latents.py autoencoder=<export> source=<shards> out=<dir>.")
    return json.loads(path.read_text())


def check_cache(card: dict[str, Any], expected: str, where: str = "the latent cache") -> None:
    """Refuse a cache whose latents came from another autoencoder (or latent statistics); `expected` is the
    autoencoder's `weights_hash`."""
    if card.get("autoencoder_sha256") != expected:
        raise ValueError(
            f"{where} was written with autoencoder {card.get('autoencoder_sha256')} ({card.get('autoencoder')}), but "
            f"this model's autoencoder is {expected}: its latents would be meaningless here. Re-run "
            "scripts/cache_latents.py with this autoencoder, or point model.autoencoder.path at the cache's one.")


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.numpy(), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def cache_shard(autoencoder: AutoencoderKL, url: str, out_path: Path, *, resolution: int, batch_size: int = 64,
                dtype: torch.dtype = torch.float32, summary: CacheSummary | None = None,
                buckets: Sequence[tuple[int, int]] | None = None,
                text_encoder: OpenCLIPTextEncoder | None = None) -> int:
    """Encode one image shard (centre crop, no flip; with `buckets`, each image at its aspect-ratio bucket) into
    `out_path`, and with `text_encoder` each caption's states (tokens, pooled, mask); returns the samples written."""
    device = next(autoencoder.parameters()).device
    loader = ShardLoader(url, batch_size=batch_size, resolution=resolution, mode="epoch", num_workers=0,
                         shuffle=False, shuffle_buffer=0, drop_last=False, crop="center", flip=False,
                         buckets=buckets)
    records, start = [], time.time()
    for batch in loader:
        posterior = autoencoder.encode(batch["image"].to(device))
        moments = torch.stack([posterior.mean, posterior.std], dim=1).to("cpu", dtype)  # (B, 2, c, h, w)
        texts: list[dict[str, bytes]] = [{} for _ in batch["key"]]
        if text_encoder is not None:
            cond = text_encoder.encode(batch["caption"])
            fields = [cond.tokens.to("cpu", dtype), cond.pooled.to("cpu", dtype), cond.mask.cpu()]
            texts = [{ext: _npy(f[i]) for ext, f in zip(TEXT_EXTENSIONS, fields)} for i in range(len(texts))]
        for key, caption, latent, text in zip(batch["key"], batch["caption"], moments, texts):
            records.append({"__key__": key, "txt": caption.encode("utf-8"), LATENT_EXTENSION: _npy(latent), **text})
        if summary is not None:
            summary.skipped.update({k: v for k, v in batch["skips"].items() if v})
    write_shard(out_path, records, start)
    return len(records)


def cache_latents(autoencoder: AutoencoderKL, source: str | Sequence[str], out_dir: str | Path, *, resolution: int,
                  batch_size: int = 64, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                  progress: bool = True, buckets: Sequence[tuple[int, int]] | None = None,
                  text_encoder: OpenCLIPTextEncoder | None = None) -> CacheSummary:
    """Encode every shard of `source` into `out_dir`, shard i on rank i % world_size. Finished shards (tar and
    stats present) are skipped, so an interrupted run resumes where it stopped. With `buckets` each latent keeps its
    image's aspect-ratio bucket (latent sizes vary; the loader batches one size at a time); the card lists them.
    With a (frozen) `text_encoder` each caption's states are cached too, and the card records the encoder."""
    if text_encoder is not None and not text_encoder.freeze:
        raise ValueError("text_encoder must be frozen (freeze=true) to cache its states: a trained encoder's states "
                         "change every step")
    urls = expand_urls(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {**cache_identity(autoencoder, resolution), "dtype": str(dtype).removeprefix("torch."),
                "source": [str(u) for u in urls], "autoencoder": autoencoder.config,
                "buckets": [list(b) for b in buckets] if buckets else None,
                "text_encoder": text_identity(text_encoder) if text_encoder is not None else None}
    card_path = out / CARD
    if card_path.is_file():
        card = read_card(out)
        check_cache(card, identity["autoencoder_sha256"], f"the existing cache in {out}")
        if card.get("text_encoder") != identity["text_encoder"]:  # resumed shards would lack them, or differ
            how = "with the states of another text encoder" if card.get("text_encoder") else "without text states"
            raise ValueError(f"the existing cache in {out} was written {how}: write this one to a new folder")
    elif rank == 0:
        card_path.write_text(json.dumps(identity, indent=2))
    summary = CacheSummary()
    mine = urls[rank::world_size]
    for url in tqdm(mine, desc=f"caching latents (rank {rank})", unit="shard", disable=not progress):
        target = out / Path(url).name
        if target.is_file() and stats_path(target).is_file():
            summary.resumed.append(target)
            continue
        summary.samples += cache_shard(autoencoder, url, target, resolution=resolution, batch_size=batch_size,
                                       dtype=dtype, summary=summary, buckets=buckets, text_encoder=text_encoder)
        summary.written.append(target)
    return summary
