"""SD3 / SD3.5 MMDiT (and MMDiT-X). Module names follow the Stability checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import gated_residual, norm_modulate, qk_norm_rope
from .attention import gather_tokens, shard_tokens
from .base import Transformer
from .layers import FinalLayer, SequentialEmbedder, gelu_tanh, modulations, split_heads, timestep_embedding
from .rows import PLAIN, BlockRows, RowPlan


@dataclass(frozen=True)
class SD3Config:
    """SD3 / SD3.5 MMDiT (and MMDiT-X with dual attention)."""

    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # the stored table is (1, M*M, hidden), centre-cropped per image
    context_dim: int = 4096  # T5 width; CLIP features are zero-padded to it
    pooled_dim: int = 2048  # CLIP-L pooled (768) ++ CLIP-G projected (1280)
    qk_norm: bool = False  # RMSNorm(head_dim) on q and k (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X: extra image-only attention
    mlp_ratio: float = 4.0
    family: str = field(default="sd3", init=False)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(self.dual_attention_layers)))
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")
        if self.num_layers < 1 or self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(f"num_layers={self.num_layers}, num_heads={self.num_heads}, "
                             f"head_dim={self.head_dim} must all be >= 1")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def total_blocks(self) -> int:
        return self.num_layers

    def adjust(self, overrides: dict) -> dict:
        """Overrides of a preset, completed: ``num_layers`` also trims ``dual_attention_layers``."""
        if "num_layers" in overrides and "dual_attention_layers" not in overrides:
            overrides["dual_attention_layers"] = tuple(i for i in self.dual_attention_layers
                                                       if i < overrides["num_layers"])
        return overrides


PRESETS = {
    "sd3-medium": SD3Config(num_layers=24, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": SD3Config(num_layers=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                              dual_attention_layers=tuple(range(13))),
    "sd3.5-large": SD3Config(num_layers=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
}


class RMSWeight(nn.Module):
    """The learned weight of a per-head RMSNorm (applied by ``qk_norm_rope``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    """qkv projection (+ qk RMSNorm) and output projection of one stream."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = RMSWeight(dim // heads)
            self.ln_k = RMSWeight(dim // heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, h: torch.Tensor):
        """h (B, L, D) -> q, k, v each (B, H, L, Dh)."""
        q, k, v = split_heads(self.qkv(h), self.heads)
        if hasattr(self, "ln_q"):
            q, k = qk_norm_rope(q, k, self.ln_q.weight, self.ln_k.weight)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k, v.transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h):
        return self.fc2(gelu_tanh(self.fc1(h)))


class StreamBlock(nn.Module):
    """One stream (x_block or context_block) of a joint block: adaLN, attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.n_mod = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))
        self.attn = SelfAttention(dim, heads, qk_norm, pre_only)
        if dual:
            self.attn2 = SelfAttention(dim, heads, qk_norm)
        if not pre_only:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def pre_attention(self, h: torch.Tensor, c: torch.Tensor):
        """-> (q, k, v), the modulations."""
        mods = modulations(self.adaLN_modulation(c), self.n_mod)
        return self.attn.qkv_heads(norm_modulate(h, mods[0].shift, mods[0].scale)), mods

    def post_attention(self, h, a, mods, rows: BlockRows, stream: str):
        """h + gate*proj(a) [+ gate2*attn2] + gate_mlp*MLP; the last residual is ``rows``' (DG's fork)."""
        msa, mlp = mods[0], mods[1]
        out = gated_residual(h, self.attn.proj(a), msa.gate)  # h + gate * attn
        if self.dual:  # MMDiT-X: a second, image-only attention on the block's input
            msa2 = mods[2]
            q, k, v = self.attn2.qkv_heads(norm_modulate(h, msa2.shift, msa2.scale))
            out = gated_residual(out, self.attn2.proj(rows.attention(q, k, v)), msa2.gate)
        return rows.residual(out, self.mlp(norm_modulate(out, mlp.shift, mlp.scale)), mlp.gate, stream)


class JointBlock(nn.Module):
    """Joint attention over [context ; image] tokens, then per-stream MLPs."""

    def __init__(self, config: SD3Config, index: int):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        last = index == config.num_layers - 1
        self.context_block = StreamBlock(dim, heads, config.mlp_ratio, config.qk_norm, pre_only=last)
        self.x_block = StreamBlock(dim, heads, config.mlp_ratio, config.qk_norm,
                                   dual=index in config.dual_attention_layers)

    def modulated_input(self, ctx, x, c) -> torch.Tensor:
        """The image stream's first normalised, modulated input (TeaCache's probe)."""
        mods = modulations(self.x_block.adaLN_modulation(c), self.x_block.n_mod)
        return norm_modulate(x, mods[0].shift, mods[0].scale)

    def forward(self, ctx, x, c, rows: BlockRows = PLAIN):
        """ctx (B, Lc, D), x (B, N, D), c (B, D) -> (ctx or None after the last block, x)."""
        (qc, kc, vc), cmods = self.context_block.pre_attention(ctx, c)
        (qx, kx, vx), xmods = self.x_block.pre_attention(x, c)
        Lc = ctx.shape[1]
        if self.context_block.pre_only:  # last block: context tokens are keys/values only
            ax = rows.attention(qx, torch.cat([kc, kx], 2), torch.cat([vc, vx], 2), text=0, key_text=Lc)
            return None, self.x_block.post_attention(x, ax, xmods, rows, "image")
        a = rows.attention(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2), text=Lc)
        ac, ax = a.split([Lc, x.shape[1]], dim=1)
        x = self.x_block.post_attention(x, ax, xmods, rows, "image")
        return self.context_block.post_attention(ctx, ac, cmods, rows, "text"), x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        # (B, h*w, D), row-major tokens; contiguous, or the whole residual stream would inherit
        # the conv's channel-major strides (every LayerNorm then copies, every add is strided)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class SD3Transformer(Transformer):
    """``v = model(x, sigma, context, pooled)``: x (B, 16, H, W) latents, sigma (B,) in [0, 1]."""

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        M = config.pos_embed_max_size
        self.x_embedder = PatchEmbed(p, config.in_channels, dim)
        self.register_buffer("pos_embed", torch.zeros(1, M * M, dim))  # stored in checkpoints
        self.t_embedder = SequentialEmbedder(256, dim)
        self.y_embedder = SequentialEmbedder(config.pooled_dim, dim)
        self.context_embedder = nn.Linear(config.context_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(config, i) for i in range(config.num_layers))
        self.final_layer = FinalLayer(dim, p * p * config.out_channels)
        self.ma = None

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre (h, w) crop of the stored M x M table -> (1, h*w, D)."""
        M = self.config.pos_embed_max_size
        if h > M or w > M:
            p = self.config.patch_size
            raise ValueError(f"latent {h * p}x{w * p} is larger than this model's position table "
                             f"({M * p}x{M * p} latent, i.e. {M * p * 8}px); use a smaller image")
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.view(1, M, M, -1)[:, top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def velocity(self, x, sigma, context, pooled, guidance=None, *, rows: RowPlan):
        """x (B, C, H, W), sigma (B,) float32, context (B, L, Dc), pooled (B, Dp) -> (B', C, H, W);
        ``guidance`` is accepted and unused (SD3 has no distilled guidance)."""
        B, C, H, W = x.shape
        cfg, p = self.config, self.config.patch_size
        if context.shape[-1] != cfg.context_dim or pooled.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}) and pooled (B, {cfg.pooled_dim}), "
                             f"got {tuple(context.shape)} and {tuple(pooled.shape)}")
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be a multiple of the patch size {p} "
                             f"(image size a multiple of {8 * p})")
        h, w = H // p, W // p
        img = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder(timestep_embedding(1000 * sigma).to(x.dtype)) + self.y_embedder(pooled)
        ctx = self.context_embedder(context)
        ctx, img = shard_tokens(ctx, "text"), shard_tokens(img, "image")  # sequence parallel: this rank's tokens
        (ctx, img), c = rows.run_blocks(self.joint_blocks, (ctx, img), c)
        out = gather_tokens(self.final_layer(img, c))  # (B', h*w, p*p*C) with (p, q, c) order per token
        out = out.view(-1, h, w, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(-1, cfg.out_channels, H, W)
