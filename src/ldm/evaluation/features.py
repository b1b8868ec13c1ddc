"""Image features for FID and KID: the standard InceptionV3 pool3 (torch-fidelity's port of the TF graph of Heusel
et al., 2017, run through torchmetrics) and a small seeded random conv net, so tests and smoke runs need no weights.

Every extractor maps images (B, 3, H, W) in [-1, 1] to features (B, D) float64 and carries a `name`: statistics
computed with one extractor are never compared with features of another.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.utils.hub_weights import torch_hub_file

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_KEY = "features.weights"  # in conf/evaluate.yaml; callbacks.evaluate.features.weights when training
INCEPTION_ENV = "LDM_INCEPTION_WEIGHTS"


class FeatureExtractor(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> features (B, num_features) float64; frozen, always in eval mode."""

    name: str
    num_features: int

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class InceptionFeatures(FeatureExtractor):
    """The 2048-d pool3 features of the FID Inception network (torchmetrics `NoTrainInceptionV3`, which needs the
    `torch-fidelity` package). Images are quantised to uint8 first, as when they are saved as PNGs.

    Args:
        weights: a local copy of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`. None: torch hub's
            cache, else a download, which fails within seconds offline with a message naming this option.
        antialias: resize to 299 px with an antialiased bilinear filter (clean-fid's advice) instead of the
            TF1-compatible bilinear resize of the original FID code (False, comparable with published numbers).
    """

    def __init__(self, weights: str | None = None, antialias: bool = False) -> None:
        super().__init__()
        path = inception_weights(weights)  # first: fail fast, before importing or building anything
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError("The FID Inception network comes from torch-fidelity, which is not installed: "
                                      "`pip install torch-fidelity` (or features=random for a smoke test).")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path,
                                      antialias=antialias)
        self.net.requires_grad_(False)
        self.name = "inception-v3-pool3" + ("-antialias" if antialias else "")
        self.num_features = 2048
        self.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        uint8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(uint8.to(self.device)).double()  # (B, 2048)


class RandomFeatures(FeatureExtractor):
    """A fixed, randomly initialised conv net: features for tests and smoke runs, without any download. Its FID
    behaves like a distance between image distributions but is on no published scale.

    Args:
        size: images are resized to size x size first, so features do not depend on the resolution.
    """

    def __init__(self, num_features: int = 64, seed: int = 0, size: int = 32) -> None:
        super().__init__()
        widths = (3, 16, 32, num_features)
        self.net = nn.Sequential(*(layer for c_in, c_out in zip(widths[:-1], widths[1:])
                                   for layer in (nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU())),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.net:
                if isinstance(conv, nn.Conv2d):  # He init from our own generator: the same net on every machine
                    fan_in = conv.weight[0].numel()
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / fan_in))
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        self.requires_grad_(False).eval()
        self.size, self.num_features = size, num_features
        self.name = f"random-conv-{num_features}-seed{seed}-{size}px"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float().to(self.device), size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)
        return self.net(x).double()  # (B, num_features)


def inception_weights(path: str | None) -> str | None:
    """A local Inception weights file (`path`, else torch hub's cache), or None when a download can work;
    raises at once, saying how to get the file, when none of these is possible."""
    local = torch_hub_file(INCEPTION_URL, path, key=INCEPTION_KEY, what="Inception weights",
                           needed="FID/KID need the Inception weights", how_to_get=_HOW_TO_GET)
    return str(local) if local is not None else None  # None: torch-fidelity downloads it into the hub cache


_HOW_TO_GET = (f"In training the key is callbacks.evaluate.features.weights; the environment variable "
               f"{INCEPTION_ENV} sets both. Get the file on a machine with internet (`wget {INCEPTION_URL}`), then "
               f"point {INCEPTION_KEY} at it or place it in torch hub's cache folder "
               "(~/.cache/torch/hub/checkpoints/). For a smoke test without weights use features=random.")
