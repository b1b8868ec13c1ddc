"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on a backbone's attention and MLP projections.

peft does the work: its `LoraLayer` wraps our plain `nn.Linear`s in place (fused qkv / kv projections too: a rank-r
update of the fused weight is the same as rank-r updates of its q, k, v rows sharing one A), keeps the base weight
frozen as `<name>.base_layer.weight` and merges exactly. Which modules are targets is the backbone's business: each
declares `lora_targets = {"attention": (...), "mlp": (...)}`, module-name suffixes, so a new backbone adds one line.

The adapter file (`save_adapter`): `lora.safetensors` (peft names without the adapter name, `<module>.lora_A.weight`,
`<module>.lora_B.weight`) and `lora.json` (rank, alpha, targets, the base backbone's class and config and its hash).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldm.utils.logging import get_logger

log = get_logger(__name__)
Targets = Literal["attention", "attention+mlp"]
Init = Literal["kaiming", "gaussian", "random"]
ADAPTER_FILE, CARD_FILE, FORMAT = "lora.safetensors", "lora.json", "ldm-lora"
# peft's `init_lora_weights`: B = 0 for the first two (the adapted model starts as the base model); "random" draws B
# too, so the adapter changes outputs from the start (tests of merging and saving need that).
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "random": False}
# Backbone settings that change training, not the weights or what they compute at sampling time.
_TRAINING_ONLY = {"gradient_checkpointing", "dropout"}


class LoRA:
    """Adapters of rank `rank` on the backbone's attention (q, k, v, out; self- and cross-) projections, and with
    targets="attention+mlp" on its feed-forward ones; the update is (alpha / rank) * B A.

    Args:
        alpha: scale numerator; None means alpha = rank (scale 1), as diffusers' training scripts default.
        init: "kaiming" (peft's and Microsoft's default: A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/rank),
            B = 0), or "random" (B random as well: not the base model at step 0; for tests).
    """

    def __init__(self, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 targets: Targets = "attention", init: Init = "kaiming") -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if targets not in ("attention", "attention+mlp"):
            raise ValueError(f"LoRA targets must be 'attention' or 'attention+mlp', got {targets!r}")
        if init not in _PEFT_INIT:
            raise ValueError(f"LoRA init must be one of {sorted(_PEFT_INIT)}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else rank)
        self.dropout, self.targets, self.init = float(dropout), targets, init

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> dict[str, Any]:
        """The settings, as a checkpoint and an adapter card record them; `LoRA(**describe())` rebuilds it."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                "init": self.init}

    def target_modules(self, backbone: nn.Module) -> list[str]:
        """The full names of the backbone's modules that get adapters (its `lora_targets` suffixes)."""
        declared = getattr(backbone, "lora_targets", None)
        name = type(backbone).__name__
        if not isinstance(declared, dict) or not all(g in declared for g in ("attention", "mlp")):
            raise TypeError(f"{name} declares no LoRA targets: give it a class attribute lora_targets = "
                            "{'attention': (module-name suffixes), 'mlp': (...)} (see ldm.models.lora).")
        suffixes = [*declared["attention"], *(declared["mlp"] if self.targets == "attention+mlp" else ())]
        found = [n for n, m in backbone.named_modules()
                 if any(n == s or n.endswith("." + s) for s in suffixes) and not isinstance(m, LoraLayer)]
        bad = [n for n in found if not isinstance(backbone.get_submodule(n), nn.Linear)]
        if bad or not found:
            raise TypeError(f"{name}.lora_targets {suffixes} " + (f"name modules that are not nn.Linear: {bad[:3]}"
                                                                 if bad else "match no module"))
        return found

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Add adapters to `backbone` in place and freeze everything else in it; returns it."""
        if any(isinstance(m, LoraLayer) for m in backbone.modules()):
            raise ValueError(f"The {type(backbone).__name__} already carries LoRA adapters; merge them first.")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules(backbone), init_lora_weights=_PEFT_INIT[self.init])
        inject_adapter_in_model(config, backbone)
        for n, p in backbone.named_parameters():  # peft freezes the base; say so explicitly, it is our contract
            p.requires_grad_(".lora_" in n)
        return backbone


def has_lora(backbone: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in backbone.modules())


def adapter_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: `<module>.lora_A.weight` (rank, in) and `<module>.lora_B.weight` (out, rank)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(backbone).items()}


def base_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The base weights under the plain backbone's names (no adapters, `.base_layer` dropped)."""
    return {k.replace(".base_layer.", "."): v for k, v in backbone.state_dict().items() if ".lora_" not in k}


def weights_sha256(state: dict[str, Tensor]) -> str:
    """A short sha256 over names and tensors: which base weights an adapter was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:16]


def architecture(backbone: nn.Module) -> dict[str, Any]:
    """The backbone's class and constructor arguments (what stage-2 checkpoints record as `ldm.backbone`)."""
    cls = type(backbone)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **backbone.config}


def set_scale(backbone: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by `scale` (1: as trained, 0: the base model); sampling's lora_scale."""
    for m in backbone.modules():
        if isinstance(m, LoraLayer):
            for adapter in m.active_adapters:
                m.set_scale(adapter, scale)


@torch.no_grad()
def merge_lora(backbone: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale B A, by peft) and put the plain `nn.Linear` back: the
    backbone is then an ordinary one, with the plain names; returns it."""
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # refuses to write NaN/Inf weights
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())
    return backbone


def load_adapter_state(backbone: nn.Module, state: dict[str, Tensor], source: str = "the adapter") -> None:
    """Load adapter tensors into a backbone that carries adapters of the same targets and rank; anything else is
    refused naming the keys that do not fit."""
    own = adapter_state_dict(backbone)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit this {type(backbone).__name__}'s adapters: "
                         + "; ".join(f"{what} {keys[:3]}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("shapes differ for", wrong)) if keys)
                         + ". It was trained for another architecture, rank or target set.")
    result = set_peft_model_state_dict(backbone, state)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above


# ------------------------------------------------------------------ adapter files


def save_adapter(backbone: nn.Module, lora: LoRA, out_dir: str | Path, **extra: Any) -> Path:
    """Write the adapter of `backbone` (`lora.safetensors` + `lora.json`) to `out_dir`; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(backbone).items()}, str(out / ADAPTER_FILE))
    card = {"format": FORMAT, "version": 1, "lora": lora.describe(), "backbone": architecture(backbone),
            "base_sha256": weights_sha256(base_state_dict(backbone)), **extra}
    (out / CARD_FILE).write_text(json.dumps(card, indent=2))
    return out


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(card, tensors) of an adapter folder (or its `lora.safetensors`, with `lora.json` beside it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / ADAPTER_FILE).is_file() or not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{path}: expected an ldm LoRA adapter, a folder with {ADAPTER_FILE} and {CARD_FILE} "
                                "(scripts/export_lora.py writes one).")
    card = json.loads((folder / CARD_FILE).read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{folder / CARD_FILE} is not an ldm LoRA card (format {card.get('format')!r}).")
    return card, load_file(str(folder / ADAPTER_FILE))


def attach_adapter(backbone: nn.Module, path: str | Path, scale: float = 1.0, merge: bool = False) -> nn.Module:
    """Add the adapter at `path` to a plain backbone (in place), scaled by `scale`; merged into the weights when
    `merge`. An adapter of another architecture is refused naming the settings that differ; one trained on other
    base weights of the same architecture (a fine-tune) is allowed with a warning."""
    card, state = read_adapter(path)
    own = architecture(backbone)
    differ = {k: (card["backbone"].get(k), own.get(k)) for k in {*own, *card["backbone"]} - _TRAINING_ONLY
              if _normal(card["backbone"].get(k)) != _normal(own.get(k))}
    if differ:
        raise ValueError(f"The LoRA {path} was trained for another backbone: "
                         + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in sorted(differ.items())[:5]) + ".")
    base = weights_sha256(base_state_dict(backbone))
    if card.get("base_sha256") not in (None, base):
        log.warning(f"The LoRA {path} was trained on base weights {card['base_sha256']}, these are {base}: "
                    "the same architecture, but another fine-tune of it.")
    LoRA(**card["lora"]).apply(backbone)
    load_adapter_state(backbone, state, f"The LoRA {path}")
    backbone.requires_grad_(False)
    set_scale(backbone, scale)
    return merge_lora(backbone) if merge else backbone


def _normal(value: Any) -> Any:
    """JSON turns tuples into lists; compare configs as JSON would store them."""
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------ a LoRA run's weights


def rebuild(state: dict[str, Tensor], backbone: dict[str, Any], lora: dict[str, Any]) -> nn.Module:
    """The backbone of a LoRA run, adapters included, from its state dict (base weights under `.base_layer` names
    plus adapters) and what its checkpoint records: the architecture (`ldm.backbone`) and the settings (`ldm.lora`)."""
    module, _, name = backbone["_target_"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    net = LoRA(**lora).apply(cls(**{k: v for k, v in backbone.items() if k != "_target_"}))
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"The LoRA run's weights do not fit a {name} with adapters {lora}: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}.")
    return net.requires_grad_(False).eval()


def merged_weights(state: dict[str, Tensor], backbone: dict[str, Any], lora: dict[str, Any]) -> dict[str, Tensor]:
    """A LoRA run's backbone weights with the adapters merged in, under the plain backbone's names: what sampling,
    the exports and `model.init_from` read from such a checkpoint."""
    return merge_lora(rebuild(state, backbone, lora)).state_dict()
