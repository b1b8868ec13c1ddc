"""CLIP score (Hessel et al., 2021, arXiv:2104.08718) with an OpenCLIP image-text model: 100 * max(cos(image,
caption), 0) per image, as torchmetrics' `CLIPScore` defines it (which wraps Hugging Face models instead)."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.text_encoder.openclip import CONFIG_DIR, register_config_dir, resolve_pretrained

PRETRAINED_KEY = "clip.pretrained"  # in conf/evaluate.yaml; callbacks.evaluate.clip_score.pretrained in training


class CLIPScore(nn.Module):
    """An OpenCLIP model that scores how well images (B, 3, H, W) in [-1, 1] match their captions; frozen.

    Args:
        model_name: an open_clip architecture (`open_clip.list_models()`, or one from `model_config_dir`).
        pretrained: an open_clip tag of that model, a local weights file, or None (random init from a fixed seed:
            tests only).
            A tag that is neither cached nor downloadable fails at once, naming the option for a local file.
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai",
                 model_config_dir: str | None = None) -> None:
        super().__init__()
        register_config_dir(CONFIG_DIR)
        if model_config_dir is not None:
            register_config_dir(model_config_dir)
        if model_name not in open_clip.list_models():
            raise ValueError(f"Unknown OpenCLIP model {model_name!r} for the CLIP score. Valid names: "
                             f"{', '.join(open_clip.list_models())}.")
        path = resolve_pretrained(model_name, pretrained, key=PRETRAINED_KEY)  # before the slow build
        tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
        preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
        with torch.random.fork_rng(devices=[]):  # random init: the same weights in every process and on every rank
            torch.manual_seed(0)
            self.model = open_clip.create_model(model_name, pretrained=path, force_preprocess_cfg=preprocess,
                                                force_quick_gelu=bool(tag.get("quick_gelu")))
        self.model.eval().requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"{model_name}/{pretrained or 'random'}"

    def train(self, mode: bool = True) -> CLIPScore:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] -> resize the short side, centre crop and normalise like open_clip's image transform."""
        x = (images.float().to(self.device).clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = max(self.size[0] / h, self.size[1] / w)
        resized = (max(self.size[0], round(h * scale)), max(self.size[1], round(w * scale)))
        x = F.interpolate(x, size=resized, mode=self.interpolation, antialias=True, align_corners=False).clamp(0, 1)
        top, left = (resized[0] - self.size[0]) // 2, (resized[1] - self.size[1]) // 2
        x = x[..., top:top + self.size[0], left:left + self.size[1]]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-image scores (B,) float64 on the CPU, in [0, 100]."""
        if len(images) != len(captions):
            raise ValueError(f"one caption per image: got {len(images)} images and {len(captions)} captions")
        image = F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float(), dim=-1)
        return (100 * (image * text).sum(-1).clamp(min=0)).double().cpu()
