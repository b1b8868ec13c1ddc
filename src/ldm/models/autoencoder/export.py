"""Export a trained autoencoder alone (safetensors + a json card) and load it back for stage 2.

The card carries the architecture, the downsampling factor f, the latent channels c, the latent
statistics and the training resolution, so stage 2 never takes a latent scale from a config constant and
`scripts/evaluate.py` needs no `resolution=`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.utils.checkpoint import read_checkpoint

WEIGHTS, CARD = "autoencoder.safetensors", "autoencoder.json"


def weights_hash(autoencoder: AutoencoderKL) -> str:
    """A short sha256 over every tensor: the autoencoder's identity (checked by latent caches later)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(autoencoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def autoencoder_mismatch(trained_with: str, given: str, where: str) -> ValueError:
    """The error for an autoencoder other than the one a stage-2 checkpoint was trained with (hashes from
    `weights_hash`); `where` names the setting that chose it."""
    return ValueError(f"This stage-2 checkpoint was trained with autoencoder {trained_with}, but {where} holds "
                      f"autoencoder {given}: another latent space, so its samples would be noise. Point {where} "
                      "at the stage-1 export the model was trained with (its export/autoencoder.json lists "
                      "weights_sha256).")


def autoencoder_hash(path: str | Path) -> str:
    """`weights_hash` of the autoencoder at `path`: read from an export's card, computed for a stage-1 `.ckpt`."""
    path = Path(path)
    card_path = (path if path.is_dir() else path.parent) / CARD
    if path.suffix != ".ckpt" and card_path.is_file():
        recorded = json.loads(card_path.read_text()).get("weights_sha256")
        if recorded:
            return str(recorded)
    return weights_hash(load_autoencoder(path))


def card(autoencoder: AutoencoderKL, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": autoencoder.config,
        "downsample_factor": autoencoder.downsample_factor,
        "latent_channels": autoencoder.latent_channels,
        "latent_scale": float(autoencoder.latent_scale),
        "latent_mean": autoencoder.latent_mean.tolist(),
        "latent_std": autoencoder.latent_std.tolist(),
        "latent_stats_set": bool(autoencoder.latent_stats_set),
        "weights_sha256": weights_hash(autoencoder),
        **extra,
    }


def export_autoencoder(autoencoder: AutoencoderKL, out_dir: str | Path, *, resolution: int | None = None,
                       **extra: Any) -> Path:
    """Write `autoencoder.safetensors` and `autoencoder.json` into `out_dir`; returns the directory.

    Args:
        resolution: the side of the images it was trained on, recorded in the card (null when unknown).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    (out / CARD).write_text(json.dumps(card(autoencoder, resolution=resolution, **extra), indent=2))
    return out


def _from_lightning_checkpoint(path: Path) -> AutoencoderKL:
    ckpt = read_checkpoint(path)
    meta = ckpt.get("ldm", {})
    if meta.get("stage") != "autoencoder" or "autoencoder" not in meta:
        raise ValueError(f"{path} is not a stage-1 (autoencoder) checkpoint of ldm (no ckpt['ldm']['autoencoder']).")
    model = AutoencoderKL(**meta["autoencoder"])
    prefix = "autoencoder."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return model


def _from_diffusers_folder(directory: Path) -> AutoencoderKL:
    """A diffusers `vae/` folder, e.g. Stable Diffusion's; its `scaling_factor` (SD's 0.18215) becomes the latent
    scale. The converter is imported here: it is only needed for this kind of folder."""
    from ldm.models.autoencoder.convert import load_diffusers_autoencoder

    kind = json.loads((directory / "config.json").read_text()).get("_class_name")
    if kind != "AutoencoderKL":
        raise ValueError(f"{directory}/config.json describes a diffusers {kind}, not an AutoencoderKL: pass a "
                         "diffusers vae/ folder or an autoencoder export (autoencoder.json + autoencoder.safetensors).")
    return load_diffusers_autoencoder(directory)


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load from an export directory, its `.safetensors`/`.json`, a stage-1 Lightning `.ckpt`, or a diffusers
    `AutoencoderKL` folder (`vae/` of a diffusers pipeline)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Autoencoder checkpoint {path} does not exist. Train stage 1 first "
                                "(python train.py experiment=autoencoder_kl_f8) or point to its export/ folder.")
    if path.suffix == ".ckpt":
        return _from_lightning_checkpoint(path)
    directory = path if path.is_dir() else path.parent
    if not (directory / CARD).is_file() and (directory / "config.json").is_file():
        return _from_diffusers_folder(directory)
    if not (directory / CARD).is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"Expected {CARD} and {WEIGHTS} in {directory} (an autoencoder export), or a diffusers "
                                "AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).")
    meta = json.loads((directory / CARD).read_text())
    model = AutoencoderKL(**meta["architecture"])
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model


def trained_resolution(path: str | Path) -> int | None:
    """The image side a stage-1 export or `.ckpt` was trained at: the card's `resolution`, or the data module's in
    the checkpoint; None when it was not recorded (cards written before the field existed)."""
    path = Path(path)
    if path.suffix == ".ckpt":
        ckpt = read_checkpoint(path, mmap=True)
        resolution = (ckpt.get("datamodule_hyper_parameters") or {}).get("resolution")
    else:
        card_path = (path if path.is_dir() else path.parent) / CARD
        resolution = json.loads(card_path.read_text()).get("resolution") if card_path.is_file() else None
    return int(resolution) if resolution else None
