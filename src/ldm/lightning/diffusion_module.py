"""Stage 2: text-conditioned latent diffusion. Wires the frozen autoencoder, the text encoder, the UNet and a
DenoisingLoss together; the formulas live in `ldm.diffusion`, the networks in `ldm.models`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ldm.data.latent_cache import check_cache, check_text_cache
from ldm.diffusion.losses import DenoisingLoss
from ldm.diffusion.process import DiffusionProcess
from ldm.inference.loading import backbone_weights, recorded_backbone
from ldm.lightning.nonfinite import NonFiniteGuard
from ldm.lightning.sharding import full_tensor, is_sharded, shard_backbone
from ldm.models.autoencoder.export import autoencoder_mismatch, weights_hash
from ldm.models.autoencoder.kl import AutoencoderKL
from ldm.models.backbone import Conditioning, check_backbone
from ldm.models.lora import LoRA
from ldm.models.text_encoder.openclip import OpenCLIPTextEncoder
from ldm.utils.checkpoint import check_architecture, config_mismatches, upgrade_stage2_checkpoint
from ldm.utils.compile import compile_blocks
from ldm.utils.flops import count_flops
from ldm.utils.logging import get_logger

OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]

log = get_logger(__name__)


def check_compatible(autoencoder: AutoencoderKL, backbone: nn.Module, text_encoder: OpenCLIPTextEncoder) -> None:
    """Refuse parts that cannot work together, naming the numbers that disagree."""
    backbone = check_backbone(backbone)
    name = type(backbone).__name__
    problems = []
    if backbone.in_channels != autoencoder.latent_channels:
        problems.append(f"the autoencoder has {autoencoder.latent_channels} latent channels but the {name} takes "
                        f"in_channels={backbone.in_channels}")
    if backbone.context_dim != text_encoder.width:
        problems.append(f"the text encoder gives {text_encoder.width}-dim token states but the {name}'s "
                        f"context_dim={backbone.context_dim}")
    if backbone.pooled_dim is not None and backbone.pooled_dim != text_encoder.pooled_dim:
        problems.append(f"the text encoder gives a {text_encoder.pooled_dim}-dim pooled embedding but the {name}'s "
                        f"pooled_dim={backbone.pooled_dim}")
    if problems:
        raise ValueError("Stage-2 parts do not fit together: " + "; ".join(problems) + ".")
    if not bool(autoencoder.latent_stats_set):
        raise ValueError("The autoencoder carries no latent statistics. Export it at the end of stage 1 (the "
                         "latent_stats callback) or with scripts/export_autoencoder.py.")


def check_latent_size(resolution: int | None, autoencoder: AutoencoderKL, backbone: nn.Module,
                      buckets: Sequence[tuple[int, int]] | None = None) -> None:
    """Refuse a training resolution (or aspect-ratio bucket) whose latents the backbone cannot take, before the
    first step."""
    f, m = autoencoder.downsample_factor, check_backbone(backbone).size_multiple
    bad = next(((h, w) for h, w in buckets or () if h % (f * m) or w % (f * m)), None)
    if bad is not None:
        raise ValueError(f"the aspect-ratio bucket {bad[0]}x{bad[1]} gives latents the {type(backbone).__name__} cannot "
                         f"take: bucket sides must be multiples of {f * m} (autoencoder factor {f} x the backbone's "
                         f"size multiple {m}); set data.bucket_multiple={f * m}")
    if resolution is None or (resolution % f == 0 and (resolution // f) % m == 0):
        return
    valid = [r for r in range(f * m, 2 * resolution + f * m, f * m)]
    nearest = min(valid, key=lambda r: abs(r - resolution))
    raise ValueError(f"data.resolution={resolution} gives {resolution / f:g}x{resolution / f:g} latents (autoencoder "
                     f"factor {f}), but the {type(backbone).__name__} needs latent sides that are multiples of {m}: "
                     f"use a resolution that is a multiple of {f * m}, e.g. {nearest}.")


def load_initial_weights(backbone: nn.Module, path: str, ema: bool | None = None) -> None:
    """Start from another run's backbone weights (EMA when it has them, unless ema=False): the next stage of a
    multi-resolution recipe (256 px, then 512). Another architecture is refused by name."""
    state, which = backbone_weights(path, ema)
    own = backbone.state_dict()
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    result = backbone.load_state_dict(state, strict=False) if not wrong else None
    if wrong or result.missing_keys or result.unexpected_keys:
        raise ValueError(f"model.init_from={path}: its backbone weights do not fit this {type(backbone).__name__}: "
                         + (f"shapes differ for {wrong[:3]}" if wrong else f"missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}")
                         + ". Initialise from a run of the same backbone config.")
    check_same_function(backbone, path)
    log.info(f"Initialised the {type(backbone).__name__} from {path} ({which} weights)")


# May differ between a run and the weights it starts from: training-time switches, and the sequence-length settings
# a multi-resolution recipe changes.
_INIT_FREE = ("gradient_checkpointing", "dropout", "sample_size", "interpolation_scale", "pos_embed_max_size")


def check_same_function(backbone: nn.Module, path: str) -> None:
    """Weights that fit by shape can still be read by another function (GroupNorm groups, attention heads): compare
    the backbone config `path` records with this one and name each difference."""
    recorded = recorded_backbone(path)
    if recorded is None:
        return
    current = {k: v for k, v in architecture(backbone).items() if k not in _INIT_FREE}
    diff = config_mismatches({k: v for k, v in recorded.items() if k not in _INIT_FREE}, current)
    if diff:
        raise ValueError(f"model.init_from={path} was trained as another {type(backbone).__name__} (recorded -> this "
                         f"run): {'; '.join(diff)}. The weights fit by shape but would compute something else: set "
                         + " ".join(f"model.backbone.{d.split(':')[0]}={recorded.get(d.split(':')[0])!r}"
                                    for d in diff if d.split(':')[0] != '_target_'))


def architecture(backbone: nn.Module) -> dict[str, Any]:
    """What a checkpoint records of its backbone: the class and the constructor arguments that rebuild it."""
    cls = type(backbone)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **backbone.config}


class DiffusionModule(L.LightningModule):
    """Trains a denoiser `backbone` (`ldm.models.backbone.Backbone`: UNet, DiT, MMDiT) on autoencoder latents,
    conditioned on the text encoder's `Conditioning`.

    Args:
        cond_drop_prob: probability that a caption is replaced by the empty prompt (classifier-free guidance).
        compile_backbone: `torch.compile` the backbone: True (or "full") compiles its whole forward, "blocks" each of
            its `blocks()` (regional compilation: one graph per distinct block, compiled once and reused, so it
            compiles in a fraction of the time and keeps working when the latent size changes).
        compile_mode: torch.compile's mode for either: "reduce-overhead" (CUDA graphs, which the sync-free step
            allows), "max-autotune", ...; None is inductor's default.
        channels_last: keep the backbone's weights in NHWC, usually faster for convolutions on recent GPUs.
        val_logsnr_bins: log-SNR values at which validation measures the x0-space error, identical for every
            schedule and parameterization so that sweeps compare on the same footing.
        lora: train low-rank adapters (`ldm.models.lora.LoRA`) on the backbone instead of the backbone: its own
            weights stay frozen (after `init_from` has loaded them) and the optimizer sees only the adapters.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_encoder: OpenCLIPTextEncoder,
        autoencoder: AutoencoderKL,
        process: DiffusionProcess,
        loss: DenoisingLoss,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        cond_drop_prob: float = 0.1,
        val_logsnr_bins: Sequence[float] = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0),
        max_nonfinite_steps: int = 20,
        compile_backbone: bool | Literal["full", "blocks"] = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        channels_last: bool = False,
        init_from: str | None = None,
        init_ema: bool | None = None,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        check_compatible(autoencoder, backbone, text_encoder)
        if init_from is not None:  # weights only: the optimizer, data, schedule and step count start afresh
            load_initial_weights(backbone, init_from, init_ema)
        self.lora = lora
        if lora is not None:  # after init_from (base weights under their plain names), before compile
            lora.apply(backbone)
        self.backbone, self.text_encoder = backbone, text_encoder
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        # Frozen, so hashed once: recorded in every checkpoint, so that sampling, evaluation and resuming refuse
        # another autoencoder (a moved or copied project whose config still names the original's file).
        self.autoencoder_sha256 = weights_hash(autoencoder)
        # one process: the loss uses its schedule and parameterization, and checkpoints record it
        self.process, self.loss = process, loss.bind(process.base_schedule, process.parameterization)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.cond_drop_prob = cond_drop_prob
        self.val_logsnr_bins = tuple(float(b) for b in val_logsnr_bins)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        # The resolved model config and resolution, set by `ldm.cli.train.build` and written into each checkpoint, so
        # that sample.py, evaluate.py and the exports need no config_resolved.yaml beside it.
        self.run_config: dict[str, Any] | None = None
        if channels_last:  # convolutions run NHWC; SDPA and linears are unaffected
            self.backbone.to(memory_format=torch.channels_last)
        # in place: parameter names (and so checkpoints) stay those of the plain backbone
        mode = {"mode": compile_mode} if compile_mode else {}
        if compile_backbone == "blocks":
            compile_blocks(check_backbone(self.backbone).blocks(), backend=compile_backend, **mode)
        elif compile_backbone in (True, "full"):
            self.backbone.compile(backend=compile_backend, **mode)
        elif compile_backbone:
            raise ValueError(f"compile_backbone must be false, true, 'full' or 'blocks', got {compile_backbone!r}")

    def train(self, mode: bool = True) -> DiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen: no dropout, no norm-statistics updates, ever
        return self

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (FSDP2) shard the backbone over the data-parallel ranks; a no-op otherwise. The
        frozen autoencoder and text encoder stay whole on every rank: they take no gradients or optimizer state."""
        mesh = self._device_mesh
        if mesh is None or is_sharded(self.backbone):
            return
        if self.lora is not None:  # untested: FSDP2 units mixing frozen base weights and adapters
            raise ValueError("model.lora with trainer=fsdp is not supported: use trainer=ddp (the frozen backbone "
                             "holds no gradients or optimizer state, so each rank needs only its weights).")
        trainable = [n for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        if trainable:  # their gradients would never be reduced across ranks
            raise ValueError(f"trainer=fsdp shards only the backbone, but {trainable[:3]} also train; freeze them "
                             "or use trainer=ddp.")
        shard_backbone(self.backbone, mesh["data_parallel"])
        # The checkpoint holds no autoencoder (see state_dict); Lightning's sharded loader checks keys itself and
        # would refuse that, so it loads non-strictly and the stage and architecture checks of
        # on_load_checkpoint stand guard.
        self.strict_loading = False

    # ------------------------------------------------------------------ inputs
    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> normalized latents (the autoencoder owns the scale/shift)."""
        return self.autoencoder.normalize(self.autoencoder.encode(images).sample(generator))

    def latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Normalized latents of a batch: drawn from a cached posterior ("latent": (B, 2, c, h, w) = mean, std) as
        `encode().sample()` would, or encoded from "image"."""
        if "latent" not in batch:
            return self.encode_images(batch["image"], generator)
        mean, std = batch["latent"].to(self.device, torch.float32).unbind(1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.autoencoder.normalize(mean + std * eps)

    def embed_captions(self, captions: Sequence[str], drop_prob: float = 0.0,
                       cached: Sequence[Tensor] | None = None) -> tuple[Conditioning, Tensor]:
        """The captions' conditioning, each caption replaced by the empty prompt with `drop_prob`; and which were.
        `cached`: the batch's text states from a latent cache ("text": tokens, pooled, mask), used instead of running
        the text encoder (on_fit_start checked that they are its own)."""
        if cached is not None:
            cond = Conditioning(*cached).to(self.device, torch.float32)
        else:
            cond = self.text_encoder.encode(list(captions)).to(self.device)
        if drop_prob == 0:  # draws nothing: validation must not move the global RNG (exact resume)
            return cond, torch.zeros(len(captions), dtype=torch.bool, device=self.device)
        drop = torch.rand(len(captions), device=self.device) < drop_prob
        return cond.where(~drop, self.text_encoder.null_embedding(1)), drop

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        card = getattr(datamodule, "cache_card", None)
        buckets = (card or {}).get("buckets") or getattr(datamodule, "buckets", None)
        check_latent_size(getattr(datamodule, "resolution", None), self.autoencoder, self.backbone, buckets)
        if card is not None:  # training from a latent cache: it must come from this very autoencoder
            check_cache(card, self.autoencoder_sha256, f"the latent cache {card.get('path', '')}")
            if getattr(datamodule, "uses_text_states", False):  # and its text states from this text encoder
                check_text_cache(card["text_encoder"], self.text_encoder, f"the latent cache {card.get('path', '')}")

    @torch.no_grad()
    def training_flops_per_sample(self, latent_hw: tuple[int, int]) -> float:
        """Model FLOPs of one training step per sample at this latent size: 3x a backbone forward (backward costs
        about twice the forward), counted on one sample. The frozen encoders are not counted (the usual MFU
        convention: what the trained model computes)."""
        z = torch.zeros(1, self.autoencoder.latent_channels, *latent_hw, device=self.device)
        cond = self.text_encoder.null_embedding(1).to(self.device)
        t = torch.full((1,), 0.5, device=self.device)
        with torch.compiler.set_stance("force_eager"):  # compiled blocks: counted eagerly, and no batch-1 recompile
            return 3.0 * count_flops(lambda: self.backbone(z, t, cond))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        z = self.latents(batch)  # (B, c, H/f, W/f)
        cond, dropped = self.embed_captions(batch["caption"], self.cond_drop_prob, batch.get("text"))
        out = self.loss(self.backbone, z, cond, schedule=self.process.schedule(*z.shape[-2:]))
        loss = out.loss.mean()
        # Not decided here: a NaN/Inf loss makes the gradient norm non-finite too, and configure_gradient_clipping
        # skips the update on the device. Returning None instead would need bool(loss) on the host every step.
        self._step_loss = loss.detach()
        bs = z.shape[0]
        self.log("train/loss", loss, batch_size=bs)  # on the bar via callbacks.progress (no per-step sync)
        self.log("train/cond_drop_rate", dropped.float().mean(), batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)  # this step's
        return loss

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by norm and check loss and gradient in one pass; a NaN/Inf on any rank skips the step on all.

        With an optimizer that takes GradScaler's `found_inf` (fused Adam/AdamW, the default) the skip happens on the
        device: the fused kernel leaves weights, moments and step counts as they were, and the host reads the
        guard's counts only every `log_every_n_steps`. Other optimizers need the decision on the host."""
        if gradient_clip_algorithm not in (None, "norm"):  # "value": Lightning clips, we still check the norm
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            gradient_clip_val = None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or float("inf"), foreach=True))
        loss = getattr(self, "_step_loss", None)
        finite = self.guard.finite(self.trainer.strategy, norm, *([] if loss is None else [loss]))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = (~finite).float()  # (a GradScaler, under 16-mixed, sets its own before the step)
        elif not bool(finite):
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients as they are
        self.log("train/grad_norm", norm, batch_size=1)  # NaN/Inf on a skipped step
        if (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.guard.report()  # the one host synchronisation, with the logging

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Its own generator: the same noise in every run, and validation never moves the global RNG, so a run
        # resumed from a checkpoint continues with the random stream of an uninterrupted one.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        z = self.latents(batch, generator)
        cond, _ = self.embed_captions(batch["caption"], cached=batch.get("text"))
        bs = z.shape[0]
        loss = self.loss(self.backbone, z, cond, generator=generator, schedule=self.process.schedule(*z.shape[-2:]))
        self.log("val/loss", loss.loss.mean(), sync_dist=True, batch_size=bs)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        for b in self.val_logsnr_bins:  # the same log-SNR values for every schedule, parameterization and shift
            logsnr = torch.full((bs,), b, device=z.device)
            denoised = self.process.denoise_vp(self.backbone, self.process.noised(z, noise, logsnr), logsnr, cond)
            self.log(f"val/x0_mse_logsnr_{b:+.0f}", (denoised - z).square().mean(), sync_dist=True, batch_size=bs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Frozen parts that come from their own files stay out (~1.5 GB per SD-size checkpoint); a frozen but
        randomly initialised text encoder stays in, since nothing else could rebuild it for sampling."""
        state = super().state_dict(*args, **kwargs)
        frozen_prefixes = ["autoencoder."] + (["text_encoder."] if self.text_encoder.rebuildable else [])
        return {k: v for k, v in state.items() if not any(k.startswith(p) for p in frozen_prefixes)}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        missing_ok = {k for k in super().state_dict() if k not in self.state_dict()}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if k not in missing_ok]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"Checkpoint does not match the model: missing {missing[:5]}, "
                                   f"unexpected {result.unexpected_keys[:5]}")
        return result

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm"] = {"stage": "diffusion", "backbone": architecture(self.backbone),
                             "process": self.process.describe(),
                             "autoencoder": self.autoencoder.config,
                             "latent_scale": float(self.autoencoder.latent_scale),
                             "autoencoder_sha256": self.autoencoder_sha256,
                             "nonfinite": self.guard.state_dict()}
        if self.run_config is not None:
            checkpoint["ldm"]["config"] = self.run_config
        if self.lora is not None:  # the state dict then holds `<name>.base_layer.weight` and the adapters
            checkpoint["ldm"]["lora"] = self.lora.describe()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = upgrade_stage2_checkpoint(checkpoint).get("ldm", {})
        if meta.get("stage", "diffusion") != "diffusion":
            raise ValueError(f"This is a {meta['stage']!r} checkpoint; stage 2 resumes only diffusion checkpoints.")
        check_architecture(meta.get("backbone"), architecture(self.backbone), "backbone")
        check_architecture(meta.get("process"), self.process.describe(), "diffusion process")
        own_lora = None if self.lora is None else self.lora.describe()
        if meta.get("lora") != own_lora:
            raise ValueError(f"The checkpoint was trained with LoRA {meta.get('lora')}, this model has {own_lora}: "
                             "resume with the same model.lora settings (a new LoRA starts from it with "
                             "model.init_from=<checkpoint> instead).")
        trained_with = meta.get("autoencoder_sha256")  # absent in checkpoints from before it was recorded
        if trained_with is not None and trained_with != self.autoencoder_sha256:
            raise autoencoder_mismatch(trained_with, self.autoencoder_sha256, "model.autoencoder.path")
        if "nonfinite" in meta:
            self.guard.load_state_dict(meta["nonfinite"])
