"""OpenCLIP text tower (Cherti et al., 2023, arXiv:2212.07143) as the prompt encoder of latent diffusion.

Stable Diffusion 2.x cross-attends to the penultimate layer of ViT-H/14 after `ln_final`; only the text
tower is built, and tagged weights fail fast and clearly when they can be neither found nor downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

import open_clip
import torch
from open_clip.model import _build_text_tower  # builds the text tower alone: no ~630 M-param ViT-H visual
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from ldm.models.backbone import Conditioning
from ldm.utils.hub_weights import PROBE_TIMEOUT_S, WeightsFileNotFound, WeightsUnavailable, hub_reachable

Layer = Literal["last", "penultimate"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # ships `ldm-tiny-text.json`
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference
PRETRAINED_KEY = "model.text_encoder.pretrained"
_registered_config_dirs: set[str] = set()


class OpenCLIPTextEncoder(nn.Module):
    """Prompts -> per-token states of the last or penultimate layer, plus the pooled CLIP embedding.

    Args:
        model_name: an open_clip architecture (`open_clip.list_models()`), or one from `model_config_dir`.
        pretrained: an open_clip tag of that model, a local weights file (a full CLIP checkpoint or state
            dict, `.bin/.pt/.safetensors`; visual weights are ignored), or None for random init.
        layer: "penultimate" (SD 2.x: all blocks but the last, then `ln_final`) or "last".
        freeze: eval mode for good, no gradients; `trainable_layers` must then be 0.
        trainable_layers: with `freeze=False`, -1 trains the whole tower (embeddings and projection too);
            N in [1, layers] trains only the last N blocks and `ln_final`. With layer="penultimate" the
            last block only feeds `pooled`.
        context_length: tokens per prompt; None keeps the model's (77). Shorter contexts keep the first
            positional embeddings of a checkpoint.
        model_config_dir: a folder of extra open_clip json configs, registered with `add_model_config`.
        cache_size: a frozen encoder keeps the encodings of up to this many distinct prompts (least recently used
            dropped first), exact since its weights never change, each encoded alone so that it does not depend
            on the batch it was first seen in (resume stays bit-exact): for data whose captions repeat (the built-in
            shapes have a few hundred), where the text tower is ~12% of a tiny stage-2 step. 0 (the default, right
            for web captions that rarely repeat) caches nothing.
    """

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: Layer = "penultimate",
        freeze: bool = True,
        trainable_layers: int = 0,
        context_length: int | None = None,
        model_config_dir: str | None = None,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if cache_size < 0 or (cache_size and not freeze):
            raise ValueError(f"cache_size must be >= 0 and needs freeze=true (a trained encoder changes its "
                             f"encodings), got cache_size={cache_size}, freeze={freeze}")
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        register_config_dir(CONFIG_DIR)
        if model_config_dir is not None:
            register_config_dir(model_config_dir)
        model_cfg = text_model_config(model_name)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        checkpoint = resolve_pretrained(model_name, pretrained)  # before the slow build: fail fast

        text_cfg = model_cfg["text_cfg"]
        if context_length is not None:
            text_cfg["context_length"] = context_length
        quick_gelu = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
        self.text: TextTransformer = _build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        if checkpoint is not None:
            load_text_weights(self.text, checkpoint)

        num_layers = len(self.text.transformer.resblocks)
        if layer == "penultimate" and num_layers < 2:
            raise ValueError(f"layer='penultimate' needs at least 2 blocks; {model_name} has {num_layers}")
        self.model_name, self.layer, self.freeze = model_name, layer, freeze
        self.pretrained = pretrained  # None: random init, so only a checkpoint can reproduce these weights
        self._grad_from = set_trainable(self.text, freeze, trainable_layers)  # first block that trains
        self._tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)
        self._warned_truncation = False
        self._null: Conditioning | None = None  # cached "" encoding of a frozen encoder
        self._null_key: tuple[torch.device, torch.dtype] | None = None
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()  # prompt -> batch-1 encoding, LRU order
        self._cache_key: tuple[torch.device, torch.dtype, torch.dtype | None] | None = None
        self.register_load_state_dict_post_hook(_drop_null_cache)
        self.train(not freeze)

    @property
    def rebuildable(self) -> bool:
        """True when the constructor alone restores these weights: frozen and loaded from `pretrained`."""
        return self.freeze and self.pretrained is not None

    @property
    def width(self) -> int:
        """D, the size of each token state."""
        return self.text.width

    @property
    def context_length(self) -> int:
        """L, the tokens per prompt."""
        return self.text.context_length

    @property
    def pooled_dim(self) -> int:
        """P, the size of the pooled embedding."""
        proj = self.text.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        """Frozen encoders ignore `train()` and stay in eval mode."""
        return super().train(mode and not self.freeze)

    # ------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """open_clip's tokenizer for this model: (B, L) int64 on the CPU; longer prompts are truncated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.context_length
        tokens = self._tokenizer(prompts, context_length=n + 1)  # one spare slot reveals truncation
        truncated = tokens[:, n] != self.text.pad_id
        if not truncated.any():
            return tokens[:, :n]
        self._warn_truncation(int(truncated.sum()), len(prompts))
        return self._tokenizer(prompts, context_length=n)  # open_clip's own truncation (ends with EOT)

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Tokenize and encode; "" is the unconditional prompt. With `cache_size`, only unseen prompts are encoded."""
        device = self.text.token_embedding.weight.device
        if not self.cache_size:
            return self(self.tokenize(prompts).to(device))
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (device, self.text.token_embedding.weight.dtype, autocast)
        if self._cache_key != key:  # stale after .to(), or encoded under another autocast dtype
            self._cache.clear()
            self._cache_key = key
        # Each unseen prompt is encoded alone: a batched forward rounds differently at another batch size (~1e-6),
        # so batching the misses would make a prompt's encoding depend on the batch it was first seen in, and a
        # resumed run (cold cache, other batches) would drift from an uninterrupted one.
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self(self.tokenize([prompt]).to(device))
        rows = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return Conditioning(*(None if f[0] is None else torch.cat(f) for f in zip(*rows)))

    def forward(self, tokens: Tensor) -> Conditioning:
        """Encode token ids (B, L <= context_length)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected tokens of shape (B, L<={self.context_length}), got {tuple(tokens.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self._encode_tokens(tokens)

    def null_embedding(self, batch_size: int = 1) -> Conditioning:
        """Encoding of "", the unconditional input of classifier-free guidance (Ho & Salimans, 2022)."""
        if not self.freeze:  # weights move during training: recompute, with gradients when enabled
            return self.encode([""]).expand(batch_size)
        weight = self.text.token_embedding.weight
        if self._null is None or self._null_key != (weight.device, weight.dtype):  # stale after .to()
            self._null, self._null_key = self.encode([""]), (weight.device, weight.dtype)
        return self._null.expand(batch_size)

    def _encode_tokens(self, tokens: Tensor) -> Conditioning:
        text, n = self.text, tokens.shape[1]
        blocks = text.transformer.resblocks
        grad = torch.is_grad_enabled()
        cast_dtype = text.transformer.get_cast_dtype()
        with torch.set_grad_enabled(grad and self._grad_from < 0):  # frozen prefix: keep no activations
            x = text.token_embedding(tokens).to(cast_dtype) + text.positional_embedding[:n].to(cast_dtype)
        attn_mask = None if text.attn_mask is None else text.attn_mask[:n, :n]  # causal
        penultimate = x
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            with torch.set_grad_enabled(grad and i >= self._grad_from):
                x = block(x, attn_mask=attn_mask)  # (B, L, D), batch-first in open_clip 3.x
        final = text.ln_final(x)
        states = final if self.layer == "last" else text.ln_final(penultimate)
        # tokens (B, L, D); pooled (B, P): the EOT state of the last layer, projected (open_clip's `encode_text`);
        # mask (B, L): True from SOT to EOT (SD 2.x ignores it and attends to all L positions)
        return Conditioning(states, self._pool(final, tokens), tokens != text.pad_id)

    def _pool(self, final: Tensor, tokens: Tensor) -> Tensor:
        pooled = text_global_pool(final, tokens, self.text.pool_type, eos_token_id=self.text.eos_id)  # (B, D)
        proj = self.text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, P)

    def _warn_truncation(self, num_truncated: int, num_prompts: int) -> None:
        if self._warned_truncation:
            return
        self._warned_truncation = True
        n = self.context_length
        warnings.warn(
            f"{num_truncated} of {num_prompts} prompts were longer than {n} tokens and were truncated to {n} "
            f"(SOT + {n - 2} tokens + EOT); later truncations by this text encoder are not reported.",
            UserWarning,
            stacklevel=3,
        )


def _drop_null_cache(module: OpenCLIPTextEncoder, incompatible_keys: object) -> None:
    module._null = None  # new weights: the cached encodings are stale (a named function, so it pickles)
    module._cache.clear()


# ----------------------------------------------------------------------------------------------------
# Building and freezing
# ----------------------------------------------------------------------------------------------------


def register_config_dir(path: str | Path) -> None:
    """Make the open_clip json configs in `path` known to open_clip (once per folder)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise ValueError(f"model_config_dir must be a folder of open_clip json configs, got {path}")
    if str(path) not in _registered_config_dirs:
        open_clip.add_model_config(path)
        _registered_config_dirs.add(str(path))


def text_model_config(model_name: str) -> dict:
    """open_clip's config dict for `model_name`, checked to have a plain CLIP text transformer."""
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"Unknown OpenCLIP model {model_name!r}. Valid names: {', '.join(open_clip.list_models())}. "
            "For a custom architecture pass model_config_dir=<folder of open_clip json configs>."
        )
    cfg = open_clip.get_model_config(model_name)
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name") or text_cfg.get("embed_cls") or text_cfg.get("use_pad_mask"):
        raise ValueError(
            f"{model_name} has a Hugging Face, CoCa or padding-masked text tower; only plain CLIP text "
            "transformers (e.g. ViT-B-32, ViT-L-14, ViT-H-14, ViT-bigG-14) are supported"
        )
    return cfg


def set_trainable(text: TextTransformer, freeze: bool, trainable_layers: int) -> int:
    """Set `requires_grad` per the encoder's policy; returns the first block with trainable weights."""
    num_layers = len(text.transformer.resblocks)
    if freeze:
        if trainable_layers != 0:
            raise ValueError(f"trainable_layers={trainable_layers} needs freeze=False")
        text.requires_grad_(False)
        return num_layers
    if trainable_layers == -1:
        text.requires_grad_(True)
        return -1
    if not 1 <= trainable_layers <= num_layers:
        raise ValueError(
            f"with freeze=False, trainable_layers must be -1 (whole tower) or 1..{num_layers} "
            f"(last N blocks + ln_final), got {trainable_layers}"
        )
    text.requires_grad_(False)
    for block in text.transformer.resblocks[num_layers - trainable_layers:]:
        block.requires_grad_(True)
    text.ln_final.requires_grad_(True)
    return num_layers - trainable_layers


# ----------------------------------------------------------------------------------------------------
# Weights: local files, the Hugging Face cache, downloads
# ----------------------------------------------------------------------------------------------------


def resolve_pretrained(model_name: str, pretrained: str | None, *, key: str = PRETRAINED_KEY) -> str | None:
    """Local path of the weights `pretrained` names; raises at once when a tag can't be had offline, naming
    the config `key` that takes a local file instead."""
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise _unknown_pretrained(model_name, pretrained, key)
    if cfg.get("file"):
        return cfg["file"]
    cached = _cached_weights(cfg)
    if cached is not None:
        return cached
    host, port = _download_host(cfg)
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("LDM_OFFLINE"):
        raise WeightsUnavailable(_offline_message(model_name, pretrained, cfg, "HF_HUB_OFFLINE/LDM_OFFLINE is set",
                                                  key), [key])
    if not hub_reachable(host, port):
        reason = f"{host}:{port} is unreachable (no connection within {PROBE_TIMEOUT_S:.0f} s)"
        raise WeightsUnavailable(_offline_message(model_name, pretrained, cfg, reason, key), [key])
    return open_clip.download_pretrained(cfg)


def load_text_weights(text: TextTransformer, path: str) -> None:
    """Copy the text-tower weights of a CLIP checkpoint at `path` into `text`; other keys are ignored."""
    names = list(text.state_dict())
    state = _read_text_state(path, names)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{path} lacks text-tower weights {missing[:4]}...; expected an open_clip CLIP checkpoint")
    pos, num_pos = state["positional_embedding"], text.positional_embedding.shape[0]
    if pos.shape[0] < num_pos:
        raise ValueError(f"{path} has {pos.shape[0]} positions, fewer than context_length={num_pos}")
    state["positional_embedding"] = pos[:num_pos]  # causal: the first positions never see later ones
    text.load_state_dict(state, strict=True)


def _read_text_state(path: str, names: Iterable[str]) -> dict[str, Tensor]:
    """The tensors of `names` from a checkpoint, read lazily (safetensors, or torch zip files via mmap)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            prefix = _text_prefix(keys, path)
            return {n: f.get_tensor(prefix + n) for n in names if prefix + n in keys}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files can't be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:  # training checkpoints
        state = state["state_dict"]
    prefix = _text_prefix(state.keys(), path)
    return {n: state[prefix + n] for n in names if prefix + n in state}


def _text_prefix(keys: Iterable[str], path: str) -> str:
    """The key prefix of the text tower: "" (CLIP), "text." (CustomTextCLIP), "module.", SD's "cond_stage_model.model."."""
    anchor = "token_embedding.weight"
    prefixes = [k[: -len(anchor)] for k in keys if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise ValueError(f"{path}: expected one text tower (a key ending in {anchor!r}), found {prefixes}")
    return prefixes[0]


def _cached_weights(cfg: dict) -> str | None:
    """A copy of the tag's weights already on disk: the Hugging Face hub cache, or open_clip's URL cache."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" names open_clip's default files
        for name in _candidate_files(filename):
            hit = try_to_load_from_cache(repo_id, name, cache_dir=_hf_cache_dir())
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if candidate.is_file():
            return str(candidate)
    return None


def _candidate_files(filename: str) -> list[str]:
    if not filename:
        return list(HF_WEIGHT_FILES)
    stem, ext = os.path.splitext(filename)
    return [stem + ".safetensors", filename] if ext in (".bin", ".pth") else [filename]


def _hf_cache_dir() -> str:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface")), "hub")


def _download_host(cfg: dict) -> tuple[str, int]:
    """Where a download would connect first: the hub (or its mirror), or a proxy in front of it."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else cfg["url"]
    parsed = urlparse(url)
    proxy = getproxies().get(parsed.scheme)
    if proxy and not proxy_bypass(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _offline_message(model_name: str, tag: str, cfg: dict, reason: str, key: str = PRETRAINED_KEY) -> str:
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        files = " or ".join(_candidate_files(filename))
        source = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}/{repo_id} (file {files})"
    else:
        source = cfg["url"]
    ignored = "; the visual weights are ignored" if key == PRETRAINED_KEY else ""
    return (
        f"OpenCLIP weights {model_name!r} / {tag!r} are not in the local cache ({_hf_cache_dir()}) and cannot "
        f"be downloaded: {reason}. Download them on a machine with internet from {source} and pass "
        f"{key}=/path/to/open_clip_pytorch_model.bin (any open_clip CLIP checkpoint or state dict{ignored}), "
        "or copy that machine's Hugging Face cache here and set HF_HOME."
    )


def _unknown_pretrained(model_name: str, pretrained: str, key: str = PRETRAINED_KEY) -> Exception:
    if os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        return WeightsFileNotFound(f"{key}={pretrained}: no such file", [key])
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    valid = ", ".join(tags) if tags else f"none ({model_name} has no published weights)"
    return ValueError(
        f"Unknown pretrained tag {pretrained!r} for {model_name}. Valid tags: {valid}; "
        "or a path to a weights file, or null for random init."
    )
