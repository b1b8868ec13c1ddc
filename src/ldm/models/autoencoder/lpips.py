"""LPIPS perceptual distance (Zhang et al., 2018, arXiv:1801.03924): VGG16 features + learned linear heads.

A thin wrapper over torchmetrics' implementation, whose linear-head weights ship inside the package; only the
ImageNet VGG16 backbone comes from outside, and offline it must be a local file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.utils.hub_weights import torch_hub_file

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CONFIG_KEY = "model.loss.perceptual.vgg_weights"
_PROBE_HOST = ("download.pytorch.org", 443)
_PROBE_TIMEOUT_S = 3.0


class LPIPS(nn.Module):
    """LPIPS-VGG distance between images in [-1, 1]; returns (B,). Frozen, always in eval mode.

    Args:
        vgg_weights: local torchvision VGG16 state dict (the full model's `vgg16-397923af.pth` or its
            `features.*` part). None: torch hub's cache, else a download, which fails within seconds when
            offline with a message saying how to get the file.

    The networks are kept out of `state_dict()` and `parameters()` on purpose: they are fixed, come from files,
    and would add 58 MB to every training checkpoint. `.to()`/`.half()` still move them.
    """

    def __init__(self, vgg_weights: str | None = None, config_key: str = CONFIG_KEY) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        vgg_state = _vgg_state_dict(vgg_weights, config_key)  # first: fail before spending seconds building the net
        # pnet_rand=True builds the VGG without torchvision downloading anything; we load its weights below.
        # use_dropout=True only matches the key names of the bundled heads (dropout is inactive in eval mode).
        net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, use_dropout=True)
        _load_vgg_features(net.net, vgg_state)
        net.eval().requires_grad_(False)
        self.__dict__["net"] = net  # plain attribute: not a submodule (see class docstring)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance per sample between x and y (B, 3, H, W) in [-1, 1]; differentiable in both."""
        return self.net(x, y).flatten()

    def _apply(self, fn: Any, recurse: bool = True) -> LPIPS:
        self.net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)


def _vgg_state_dict(path: str | None, config_key: str = CONFIG_KEY) -> dict[str, Tensor]:
    """The VGG16 weights from `path`, torch hub's cache or a download, failing fast when none is possible."""
    local = torch_hub_file(VGG16_URL, path, key=config_key, what="VGG16 weights",
                           needed="LPIPS needs ImageNet VGG16 weights", how_to_get=_how_to_get(config_key),
                           local_name="vgg16.pth", probe_host=_PROBE_HOST[0], timeout=_PROBE_TIMEOUT_S)
    if local is None:
        return torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False)
    return torch.load(local, map_location="cpu", weights_only=True)


def _how_to_get(config_key: str) -> str:
    return (f"Get the file on a machine with internet: `wget {VGG16_URL}` (or run "
            "`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and copy "
            f"~/.cache/torch/hub/checkpoints/{Path(VGG16_URL).name}), then point {config_key} at it, or place "
            "it in that cache folder.")


def _load_vgg_features(vgg: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy torchvision `features.<i>.*` (or bare `<i>.*`) weights into torchmetrics' sliced VGG16."""
    # torchmetrics splits vgg.features into slice1..slice5 but keeps each layer's index as its name.
    where = {name: f"{slice_name}.{name}" for slice_name, block in vgg.named_children() for name, _ in
             block.named_children()}
    mapped = {}
    for key, value in state_dict.items():
        key = key.removeprefix("features.")
        index, _, param = key.partition(".")
        if index in where:
            mapped[f"{where[index]}.{param}"] = value
    missing = set(vgg.state_dict()) - set(mapped)
    if missing:
        raise ValueError(f"not a torchvision VGG16 state dict: missing {sorted(missing)[:4]}... "
                         f"(expected keys like 'features.0.weight'; got e.g. {list(state_dict)[:4]})")
    vgg.load_state_dict(mapped, strict=True)
