"""Qwen-Image 1.0: a double-stream MMDiT over [text ; image] with a text padding mask and 3-axis RoPE.

Module names are the official checkpoint names, which are also diffusers' (the Qwen team wrote
``QwenImageTransformer2DModel``): ``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed``,
``transformer_blocks.{i}.{img_mod,txt_mod,attn.*,img_mlp,txt_mlp}``, ``norm_out``, ``proj_out``.
The pieces 2.1 shares (timestep embedder, RoPE angles) live here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gated_residual, norm_modulate, qk_norm_rope
from .attention import gather_tokens, shard_tokens
from .base import Transformer
from .flux import pack
from .layers import gelu_tanh, modulations, rope_axes, timestep_embedding
from .rows import PLAIN, BlockRows, RowPlan

FP16_MAX = 65504.0  # both Qwen-Image models clip the residual stream to this in fp16


@dataclass(frozen=True)
class QwenImageConfig:
    """Qwen-Image 1.0 (``Qwen/Qwen-Image``): 60 double-stream blocks, 24 heads x 128."""

    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int = 16  # latent channels out; proj_out gives them packed 2x2 (64)
    context_dim: int = 3584  # Qwen2.5-VL-7B's hidden size
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE split of head_dim: (frame, row, col)
    theta: int = 10000
    mlp_ratio: float = 4.0
    family: str = field(default="qwen-image", init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", rope_axes(self.axes_dim, self.head_dim, 3))
        if self.in_channels != 4 * self.out_channels:
            raise ValueError(f"in_channels={self.in_channels} must be 4 x out_channels={self.out_channels} "
                             "(the latents packed 2x2)")
        if self.num_layers < 1 or self.num_heads < 1:
            raise ValueError(f"num_layers={self.num_layers} and num_heads={self.num_heads} must be >= 1")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def total_blocks(self) -> int:
        return self.num_layers

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def adjust(self, overrides: dict) -> dict:
        """Overrides of a preset, completed: in_channels is always the packed out_channels (x 4)."""
        if "in_channels" in overrides and "out_channels" not in overrides:
            overrides["out_channels"] = overrides["in_channels"] // 4
        if "out_channels" in overrides and "in_channels" not in overrides:
            overrides["in_channels"] = 4 * overrides["out_channels"]
        return overrides


PRESETS = {"qwen-image": QwenImageConfig()}


# ---- pieces shared with Qwen-Image 2.1 ----------------------------------------------------

class TimestepEmbedder(nn.Module):
    """256-wide sinusoid -> Linear -> SiLU -> Linear (names ``linear_1``, ``linear_2``)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class TimeTextEmbed(nn.Module):
    """The official ``time_text_embed`` holder (only a timestep embedder: there is no pooled text)."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim, bias)


class Weight(nn.Module):
    """A learned per-channel norm weight (``.weight``); the norm itself is applied elsewhere."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x) * weight``, statistics in fp32; a half-precision weight multiplies in its dtype."""
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else h * weight
    return h.to(x.dtype)


def rope_angles(pos: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (L, 3) int positions -> cos, sin (L, head_dim / 2) fp32, the axes concatenated.

    Angles in fp32 as the official code computes them (``position * theta^(-2j/d)``); the pairs
    they rotate are adjacent channels ``(2j, 2j + 1)`` (a complex multiply), as ``qk_norm_rope`` does.
    """
    angles = []
    for a, d in enumerate(axes_dim):
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, device=pos.device).to(torch.float32).div(d))
        angles.append(pos[:, a, None].to(torch.float32) * inv[None])  # (L, d / 2)
    phi = torch.cat(angles, dim=-1)
    return phi.cos(), phi.sin()


def grid_positions(h: int, w: int, frame, device) -> torch.Tensor:
    """(h*w, 3) positions (frame, row, col) of an h x w token grid, row-major, centred: rows
    ``-(h - h//2) .. h//2 - 1`` (an odd grid's extra row is on the negative side), the same for cols."""
    rows = torch.arange(-(h - h // 2), h // 2, device=device).repeat_interleave(w)
    cols = torch.arange(-(w - w // 2), w // 2, device=device).repeat(h)
    return torch.stack([torch.full_like(rows, frame), rows, cols], dim=1)


def text_positions(start: int, n: int, device) -> torch.Tensor:
    """(n, 3) positions of n text tokens from ``start``: the same on all three axes."""
    return torch.arange(start, start + n, device=device)[:, None].expand(n, 3)


# ---- Qwen-Image 1.0 -----------------------------------------------------------------------

class JointAttention(nn.Module):
    """Image (to_q/k/v, to_out.0) and text (add_q/k/v_proj, to_add_out) projections, qk RMSNorms."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = Weight(head_dim), Weight(head_dim)
        self.norm_added_q, self.norm_added_k = Weight(head_dim), Weight(head_dim)

    def _heads(self, t):  # (B, L, D) -> (B, L, H, Dh)
        return t.unflatten(-1, (self.heads, -1))

    def image_qkv(self, h, cos, sin):
        """h (B, N, D) -> q, k, v each (B, H, N, Dh); q and k normed and rotated."""
        q, k = qk_norm_rope(self._heads(self.to_q(h)), self._heads(self.to_k(h)), self.norm_q.weight,
                            self.norm_k.weight, cos, sin)
        return q, k, self._heads(self.to_v(h)).transpose(1, 2)

    def text_qkv(self, h, cos, sin):
        q, k = qk_norm_rope(self._heads(self.add_q_proj(h)), self._heads(self.add_k_proj(h)),
                            self.norm_added_q.weight, self.norm_added_k.weight, cos, sin)
        return q, k, self._heads(self.add_v_proj(h)).transpose(1, 2)


class GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nn.Module):
    """GELU(tanh) MLP in the official names: ``net.0.proj``, ``net.2`` (``net.1`` is a parameterless dropout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


class QwenImageBlock(nn.Module):
    """Per-stream adaLN (shift, scale, gate) x 2, joint attention over [text ; image], per-stream MLPs."""

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        dim = config.hidden_size
        hidden = int(dim * config.mlp_ratio)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, config.num_heads)
        self.img_mlp, self.txt_mlp = FeedForward(dim, hidden), FeedForward(dim, hidden)

    def modulated_input(self, img, txt, cond) -> torch.Tensor:
        """The image stream's first normalised, modulated input (TeaCache's probe)."""
        msa, _ = modulations(self.img_mod(cond[0]), 6)
        return norm_modulate(img, msa.shift, msa.scale)

    def forward(self, img, txt, cond, cos, sin, rows: BlockRows = PLAIN):
        """img (B, N, D), txt (B, L, D), cond = (temb (B, D), key mask (B, 1, 1, L + N) bool or None),
        cos / sin (L + N, Dh / 2) in [text ; image] order -> (img, txt)."""
        temb, mask = cond
        L = txt.shape[1]
        img_msa, img_mlp = modulations(self.img_mod(temb), 6)
        txt_msa, txt_mlp = modulations(self.txt_mod(temb), 6)
        qi, ki, vi = self.attn.image_qkv(norm_modulate(img, img_msa.shift, img_msa.scale), cos[L:], sin[L:])
        qt, kt, vt = self.attn.text_qkv(norm_modulate(txt, txt_msa.shift, txt_msa.scale), cos[:L], sin[:L])
        a = rows.attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), text=L, mask=mask)
        at, ai = a.split([L, img.shape[1]], dim=1)
        img = gated_residual(img, self.attn.to_out[0](ai), img_msa.gate)  # plain gates: no tanh in 1.0
        txt = gated_residual(txt, self.attn.to_add_out(at), txt_msa.gate)
        img = rows.residual(img, self.img_mlp(norm_modulate(img, img_mlp.shift, img_mlp.scale)), img_mlp.gate, "image")
        txt = rows.residual(txt, self.txt_mlp(norm_modulate(txt, txt_mlp.shift, txt_mlp.scale)), txt_mlp.gate, "text")
        return clip_fp16(img), clip_fp16(txt)


class NormOut(nn.Module):
    """The final adaLN: ``linear`` gives (scale, shift), in that order (shift first in the blocks)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return norm_modulate(x, shift, scale)


class QwenImageTransformer(Transformer):
    """``v = model(x, sigma, context, context_mask=None)``: x (B, 16, H, W) latents, sigma (B,) in
    [0, 1], context (B, L, 3584) Qwen2.5-VL states, context_mask (B, L) 1 = token, 0 = padding.

    The 2x2 packing, the positions and the RoPE angles are internal.
    """

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_norm = Weight(config.context_dim)
        self.txt_in = nn.Linear(config.context_dim, dim)
        self.time_text_embed = TimeTextEmbed(dim)
        self.transformer_blocks = nn.ModuleList(QwenImageBlock(config) for _ in range(config.num_layers))
        self.norm_out = NormOut(dim)
        self.proj_out = nn.Linear(dim, 4 * config.out_channels)
        self.ma = None

    def velocity(self, x, sigma, context, context_mask=None, *, rows: RowPlan):
        """x (B, C, H, W), sigma (B,) float32, context (B, L, Dc), context_mask (B, L) or None -> (B', C, H, W)."""
        B, C, H, W = x.shape
        cfg = self.config
        if context.dim() != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if C != cfg.latent_channels:
            raise ValueError(f"this model takes {cfg.latent_channels} latent channels, got x of shape {tuple(x.shape)}")
        if H % 2 or W % 2:
            raise ValueError(f"Qwen-Image latents are packed 2x2: latent size {H}x{W} must be even "
                             "(image size a multiple of 16)")
        L, (h, w) = context.shape[1], (H // 2, W // 2)
        mask = None
        if context_mask is not None:
            if context_mask.shape != (B, L):
                raise ValueError(f"context_mask must be ({B}, {L}) like the context, got {tuple(context_mask.shape)}")
            keys = torch.cat([context_mask.bool(), context_mask.new_ones(B, h * w, dtype=torch.bool)], 1)
            mask = keys[:, None, None]  # (B, 1, 1, L + N): padded text keys are never attended
        img = self.img_in(pack(x))
        txt = self.txt_in(rms_norm(context, self.txt_norm.weight))
        temb = self.time_text_embed.timestep_embedder(timestep_embedding(sigma.to(x.dtype), scale=1000).to(x.dtype))
        # text positions start after the largest image coordinate (all three axes alike)
        pos = [shard_tokens(text_positions(max(h // 2, w // 2), L, x.device), "text", 0),
               shard_tokens(grid_positions(h, w, 0, x.device), "image", 0)]
        cos, sin = rope_angles(torch.cat(pos), cfg.axes_dim, cfg.theta)
        img, txt = shard_tokens(img, "image"), shard_tokens(txt, "text")  # sequence parallel: this rank's tokens
        cond = (temb, mask)
        (img, txt), cond = rows.run_blocks(self.transformer_blocks, (img, txt), cond, cos, sin)
        out = self.proj_out(self.norm_out(gather_tokens(img), cond[0]))  # (B', h*w, 4 * C), (c, dy, dx) order
        out = out.view(-1, h, w, C, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(-1, C, H, W)
