"""DiT with cross-attention to text and adaLN-single timestep modulation: PixArt-alpha (Chen et al., 2023,
arXiv:2310.00426) on the DiT backbone (Peebles & Xie, 2022, arXiv:2212.09748).

Layer for layer diffusers' `PixArtTransformer2DModel` (norm_type "ada_norm_single", no resolution/aspect-ratio
conditions), so its weights load through `ldm.models.convert_transformers`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.backbone import Conditioning
from ldm.models.embeddings import TimestepEmbedding
from ldm.models.transformer_blocks import (
    CrossAttention,
    Mlp,
    PatchEmbed,
    SelfAttention,
    SinCosPosEmbed,
    init_linear,
    key_mask,
    layer_norm,
    modulate,
    unpatchify,
)

# -------------------------------------------------------------------------------------------------------
# Block
# -------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; adaLN-single modulation (PixArt-alpha, Sec. 2.3).

    The timestep enters every block through one shared projection `t` (B, 6 * D) plus this block's learned
    `scale_shift_table` (6, D): shift/scale/gate for the self-attention and for the MLP. Cross-attention has
    neither a norm nor a gate, as in PixArt.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = SelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, t: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, D), t (B, 6 * D), context (B, L, D), mask (B, 1, 1, L) bool or None -> (B, N, D)."""
        mods = self.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)  # (B, 1, D) each
        x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, context, mask)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


# -------------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """x (B, C_in, H, W), c_noise (B,) or (), cond (tokens (B, L, context_dim), mask (B, L) or None) -> (B, C_out, H, W).

    Args:
        hidden_size / depth / num_heads: width, number of blocks and attention heads (DiT-B/2: 768 / 12 / 12).
        patch_size: H and W must be multiples of it; each p x p patch of the latent is one token.
        context_dim: width of the text tokens, projected to `hidden_size` by a two-layer MLP (PixArt's caption
            projection).
        sample_size: the latent side the positional grid is laid out for (diffusers' `sample_size`): at any other
            size the positions are stretched over the same extent, `sample_size / patch_size / interpolation_scale`
            units per axis (PixArt).
        interpolation_scale: PixArt uses 1 up to 512 px and 2 at 1024 px (diffusers: max(sample_size // 64, 1)).
        gradient_checkpointing: recompute each block in backward instead of storing its activations (Chen et al.,
            2016); outputs and gradients are unchanged.

    `c_noise` goes straight into the sinusoidal timestep features (PixArt: integer timesteps 0..999).
    Init (PixArt): Xavier-uniform Linears with zero biases, N(0, 0.02) for the timestep and caption MLPs, zero for
    every cross-attention output and the final projection, so the untrained net outputs 0.
    """

    # LoRA targets (ldm.models.lora): module-name suffixes in every DiTBlock (not the caption projection)
    lora_targets = {"attention": ("attn.qkv", "attn.out", "cross_attn.q", "cross_attn.kv", "cross_attn.out"),
                    "mlp": ("mlp.fc1", "mlp.fc2")}

    def __init__(self, in_channels: int = 4, out_channels: int = 4, hidden_size: int = 1152, depth: int = 28,
                 num_heads: int = 16, patch_size: int = 2, context_dim: int = 1024, mlp_ratio: float = 4.0,
                 sample_size: int = 32, interpolation_scale: float = 1.0,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} does not split into {num_heads} heads")
        self._config = dict(in_channels=in_channels, out_channels=out_channels, hidden_size=hidden_size, depth=depth,
                            num_heads=num_heads, patch_size=patch_size, context_dim=context_dim, mlp_ratio=mlp_ratio,
                            sample_size=sample_size, interpolation_scale=interpolation_scale)
        self.in_channels, self.out_channels, self.context_dim = in_channels, out_channels, context_dim
        self.pooled_dim: int | None = None  # no pooled text embedding: `cond.pooled` is ignored
        self.patch_size = self.size_multiple = patch_size
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = PatchEmbed(in_channels, hidden_size, patch_size)
        self.pos_embed = SinCosPosEmbed(hidden_size, base_size=sample_size // patch_size,
                                        interpolation_scale=interpolation_scale)
        self.t_embed = TimestepEmbedding(256, hidden_size)  # (B, D): also modulates the final layer
        self.t_mod = nn.Linear(hidden_size, 6 * hidden_size)  # SiLU -> this: the blocks' shared adaLN-single input
        self.context_proj = Mlp(context_dim, hidden_size, hidden_size, act="gelu_tanh")
        self.transformer_blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: `DiT(**dit.config)` builds the same architecture."""
        return dict(self._config, gradient_checkpointing=self.gradient_checkpointing)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks: FSDP2, gradient-checkpointing and regional-compile units."""
        return list(self.transformer_blocks)

    @torch.no_grad()
    def init_weights(self) -> None:
        """PixArt-alpha's `initialize_weights` (after DiT's)."""
        init_linear(self)
        for linear in (self.t_embed.linear_1, self.t_embed.linear_2, self.t_mod,
                       self.context_proj.fc1, self.context_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.cross_attn.out.weight)
            nn.init.zeros_(block.cross_attn.out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        self._check(x, cond)
        B, _, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        tokens = self.patch_embed(x)  # (B, N, D)
        x = (tokens + self.pos_embed(h, w, x.device)).to(tokens.dtype)

        emb = self.t_embed(c_noise.reshape(-1).expand(B), dtype=x.dtype)  # (B, D)
        t = self.t_mod(F.silu(emb))  # (B, 6 * D)
        context = self.context_proj(cond.tokens)  # (B, L, D)
        mask = key_mask(cond.mask)  # (B, 1, 1, L) or None

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, t, context, mask, use_reentrant=False)
            else:
                x = block(x, t, context, mask)

        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = self.proj_out(modulate(layer_norm(x), shift, scale))  # (B, N, p * p * C_out)
        return unpatchify(x, h, w, p)  # (B, C_out, H, W)

    def _check(self, x: Tensor, cond: Conditioning) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"latent height and width must be multiples of the patch size {self.patch_size}, "
                             f"got {H}x{W}")
        if cond.tokens.ndim != 3 or cond.tokens.shape[-1] != self.context_dim:
            raise ValueError(f"expected text tokens (B, L, {self.context_dim}) (context_dim), "
                             f"got {tuple(cond.tokens.shape)}")
        if cond.mask is not None and cond.mask.shape != cond.tokens.shape[:2]:
            raise ValueError(f"the attention mask must be (B, L) = {tuple(cond.tokens.shape[:2])}, "
                             f"got {tuple(cond.mask.shape)}")
