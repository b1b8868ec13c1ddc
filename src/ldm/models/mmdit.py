"""MMDiT: joint attention over image and text tokens with separate weights per stream, the Stable Diffusion 3
backbone (Esser et al., 2024, arXiv:2403.03206, Sec. 4), with optional QK-norm (SD3.5).

Layer for layer diffusers' `SD3Transformer2DModel` (without SD3.5's dual-attention layers), so its weights load
through `ldm.models.convert_transformers`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.backbone import Conditioning
from ldm.models.embeddings import TimestepEmbedding
from ldm.models.transformer_blocks import (
    Mlp,
    PatchEmbed,
    RMSNorm,
    SinCosPosEmbed,
    init_linear,
    layer_norm,
    merge_heads,
    modulate,
    split_heads,
    unpatchify,
)

Modulation = list[Tensor] | None  # gate_msa, shift_mlp, scale_mlp, gate_mlp: (B, 1, D) each

# -------------------------------------------------------------------------------------------------------
# Joint block
# -------------------------------------------------------------------------------------------------------


class Stream(nn.Module):
    """One stream's weights in a joint block (the image's or the text's): adaLN-Zero modulation, q/k/v with optional
    QK-norm, attention output and MLP. `pre_only` (the text stream of the last block) stops after q/k/v: its
    modulation is just (scale, shift) and nothing is written back (diffusers' `context_pre_only`)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 pre_only: bool = False) -> None:
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.mod = nn.Linear(dim, (2 if pre_only else 6) * dim)  # applied to SiLU(t + pooled)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        if not pre_only:
            self.out = nn.Linear(dim, dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def pre_attention(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Modulation]:
        """x (B, N, D), emb (B, D) -> q, k, v (B, heads, N, d) and the modulation `post_attention` needs."""
        if self.pre_only:  # diffusers' AdaLayerNormContinuous: (scale, shift) in that order
            scale, shift = self.mod(emb.to(x.dtype))[:, None].chunk(2, dim=-1)  # (B, 1, D) each
            rest = None
        else:  # AdaLayerNormZero
            shift, scale, *rest = self.mod(emb)[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        q, k, v = self.qkv(modulate(layer_norm(x), shift, scale)).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.norm_q(q), self.norm_k(k), v, rest

    def post_attention(self, x: Tensor, attn: Tensor, mods: Modulation) -> Tensor:
        """Gated residual updates from this stream's attention output (B, N, D) and its MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.out(attn)
        return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """SD3's MM-DiT block: each stream projects its own q/k/v, one attention runs over [image; text] tokens, and
    each stream applies its own output projection and MLP (Esser et al., 2024, Fig. 2b)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 context_pre_only: bool = False) -> None:
        super().__init__()
        self.x = Stream(dim, heads, mlp_ratio, qk_norm)
        self.c = Stream(dim, heads, mlp_ratio, qk_norm, pre_only=context_pre_only)

    def forward(self, x: Tensor, c: Tensor, emb: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image, c (B, L, D) text, emb (B, D) = SiLU(t + pooled), mask (B, 1, 1, N + L) bool or None
        -> (x, c), c None after a `context_pre_only` block."""
        qx, kx, vx, mods_x = self.x.pre_attention(x, emb)
        qc, kc, vc, mods_c = self.c.pre_attention(c, emb)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qx, qc), (kx, kc), (vx, vc)))  # (B, h, N + L, d)
        attn = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # (B, N + L, D)
        N = x.shape[1]
        x = self.x.post_attention(x, attn[:, :N], mods_x)
        return x, None if self.c.pre_only else self.c.post_attention(c, attn[:, N:], mods_c)


# -------------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """x (B, C_in, H, W), c_noise (B,) or (), cond (tokens (B, L, context_dim), pooled (B, pooled_dim), mask (B, L)
    or None) -> (B, C_out, H, W).

    Args:
        hidden_size / depth / num_heads: SD3 ties them to one number d: 64 * d, d, d (SD3 medium: d = 24).
        patch_size: H and W must be multiples of it.
        context_dim: width of the text tokens (projected to `hidden_size` by one Linear); pooled_dim: width of the
            pooled text embedding, which an MLP adds to the timestep embedding that drives every modulation.
        qk_norm: None (SD3) or "rms_norm" (SD3.5: RMSNorm of every head's queries and keys, per stream).
        sample_size, pos_embed_max_size: positions come from one pos_embed_max_size^2 sin-cos grid laid out for
            `sample_size` (diffusers' naming: the grid spans sample_size / patch_size units); a smaller latent
            takes its centre crop, so the spacing stays the same at every size (SD3). pos_embed_max_size None:
            a grid per size, stretched over the same extent (as the DiT does).
        gradient_checkpointing: recompute each block in backward instead of storing its activations.

    The mask, when given, hides padding text tokens from every query (image and text); SD3 itself uses none.
    Init: DiT's adaLN-Zero (Peebles & Xie, 2022): Xavier-uniform Linears, N(0, 0.02) for the timestep and pooled
    MLPs, zero for every modulation and the final projection, so each block starts as the identity.
    """

    # LoRA targets (ldm.models.lora): module-name suffixes in both streams (x: image, c: text) of every JointBlock
    lora_targets = {"attention": ("x.qkv", "x.out", "c.qkv", "c.out"),
                    "mlp": ("x.mlp.fc1", "x.mlp.fc2", "c.mlp.fc1", "c.mlp.fc2")}

    def __init__(self, in_channels: int = 16, out_channels: int = 16, hidden_size: int = 1536, depth: int = 24,
                 num_heads: int = 24, patch_size: int = 2, context_dim: int = 4096, pooled_dim: int = 2048,
                 mlp_ratio: float = 4.0, qk_norm: Literal["rms_norm"] | None = None, sample_size: int = 128,
                 pos_embed_max_size: int | None = 192, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} does not split into {num_heads} heads")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}")
        self._config = dict(in_channels=in_channels, out_channels=out_channels, hidden_size=hidden_size, depth=depth,
                            num_heads=num_heads, patch_size=patch_size, context_dim=context_dim, pooled_dim=pooled_dim,
                            mlp_ratio=mlp_ratio, qk_norm=qk_norm, sample_size=sample_size,
                            pos_embed_max_size=pos_embed_max_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.pooled_dim = context_dim, pooled_dim
        self.patch_size = self.size_multiple = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = PatchEmbed(in_channels, hidden_size, patch_size)
        self.pos_embed = SinCosPosEmbed(hidden_size, base_size=sample_size // patch_size, max_size=pos_embed_max_size)
        self.t_embed = TimestepEmbedding(256, hidden_size)
        self.pooled_embed = Mlp(pooled_dim, hidden_size, hidden_size, act="silu")
        self.context_embed = nn.Linear(context_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=i == depth - 1)
            for i in range(depth))
        self.out_mod = nn.Linear(hidden_size, 2 * hidden_size)  # (scale, shift) of the final norm
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: `MMDiT(**mmdit.config)` builds the same architecture."""
        return dict(self._config, gradient_checkpointing=self.gradient_checkpointing)

    def blocks(self) -> list[nn.Module]:
        """The joint blocks: FSDP2, gradient-checkpointing and regional-compile units."""
        return list(self.transformer_blocks)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's `initialize_weights`: adaLN-Zero and a zero output layer."""
        init_linear(self)
        for linear in (self.t_embed.linear_1, self.t_embed.linear_2, self.pooled_embed.fc1, self.pooled_embed.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        mods = [m for block in self.transformer_blocks for m in (block.x.mod, block.c.mod)]
        for linear in (*mods, self.out_mod, self.proj_out):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning) -> Tensor:
        self._check(x, cond)
        B, _, H, W = x.shape
        p = self.patch_size
        h, w = H // p, W // p
        tokens = self.patch_embed(x)  # (B, N, D)
        x = (tokens + self.pos_embed(h, w, x.device)).to(tokens.dtype)

        pooled = cond.pooled
        temb = self.t_embed(c_noise.reshape(-1).expand(B), dtype=pooled.dtype) + self.pooled_embed(pooled)  # (B, D)
        emb = F.silu(temb)  # every modulation reads SiLU(temb): apply it once
        c = self.context_embed(cond.tokens)  # (B, L, D)
        mask = None
        if cond.mask is not None:  # image keys always count; text keys where the mask says so
            mask = torch.cat([cond.mask.new_ones(B, h * w), cond.mask], dim=1).bool()[:, None, None, :]

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, c = checkpoint(block, x, c, emb, mask, use_reentrant=False)
            else:
                x, c = block(x, c, emb, mask)

        scale, shift = self.out_mod(emb.to(x.dtype))[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        x = self.proj_out(modulate(layer_norm(x), shift, scale))  # (B, N, p * p * C_out)
        return unpatchify(x, h, w, p)  # (B, C_out, H, W)

    def _check(self, x: Tensor, cond: Conditioning) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected latents (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W, p, M = *x.shape[-2:], self.patch_size, self.pos_embed_max_size
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {H}x{W}")
        if M is not None and (H // p > M or W // p > M):
            raise ValueError(f"a {H}x{W} latent is a {H // p}x{W // p} patch grid, larger than the positional grid "
                             f"of {M}x{M} patches (pos_embed_max_size): at most {M * p}x{M * p}")
        if cond.tokens.ndim != 3 or cond.tokens.shape[-1] != self.context_dim:
            raise ValueError(f"expected text tokens (B, L, {self.context_dim}) (context_dim), "
                             f"got {tuple(cond.tokens.shape)}")
        if cond.pooled is None or cond.pooled.ndim != 2 or cond.pooled.shape[-1] != self.pooled_dim:
            got = None if cond.pooled is None else tuple(cond.pooled.shape)
            raise ValueError(f"expected a pooled text embedding (B, {self.pooled_dim}) (pooled_dim), got {got}")
        if cond.mask is not None and cond.mask.shape != cond.tokens.shape[:2]:
            raise ValueError(f"the attention mask must be (B, L) = {tuple(cond.tokens.shape[:2])}, "
                             f"got {tuple(cond.mask.shape)}")
