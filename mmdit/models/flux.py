"""FLUX.1 (dev / schnell, and the Fill / Depth / Canny / Kontext variants). Module names follow the BFL
checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gated_residual, norm_modulate, qk_norm_rope
from .attention import gather_tokens, shard_tokens
from .base import Transformer
from .layers import FinalLayer, MLPEmbedder, gelu_tanh, modulations, split_heads, timestep_embedding
from .rows import PLAIN, BlockRows, RowPlan, per_row


@dataclass(frozen=True)
class FluxConfig:
    """FLUX.1: double-stream blocks, then single-stream blocks, 3-axis RoPE."""

    num_double: int = 19
    num_single: int = 38
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels packed 2x2 (+ conditioning: Fill 384, Depth / Canny 128)
    out_channels: int | None = None  # None: in_channels; 64 for every released FLUX.1
    context_dim: int = 4096
    pooled_dim: int = 768
    guidance_embed: bool = True  # FLUX.1-dev distilled guidance input; schnell has none
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE split of head_dim: (unused, row, col)
    theta: int = 10000
    mlp_ratio: float = 4.0
    family: str = field(default="flux", init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, "
                             f"but head_dim is {self.head_dim}; they must be equal")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dim}")
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.in_channels % 4 or self.out_channels % 4 or self.out_channels > self.in_channels:
            raise ValueError(f"in_channels={self.in_channels} and out_channels={self.out_channels} must be "
                             "multiples of 4 (2x2 packing), with out_channels <= in_channels")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def latent_channels(self) -> int:
        """The latent channels the model denoises (its output); the input may carry more."""
        return self.out_channels // 4

    @property
    def condition_channels(self) -> int:
        """Extra input channels per latent pixel (Fill: masked image + mask; Depth / Canny: control)."""
        return (self.in_channels - self.out_channels) // 4

    @property
    def total_blocks(self) -> int:
        return self.num_double + self.num_single

    def adjust(self, overrides: dict) -> dict:
        """Overrides of a preset, completed: ``num_layers`` is the total, split like the original (a
        third double blocks, rounded up); narrower latents (a test model) narrow the output too,
        wider inputs (Fill, Depth) keep it."""
        if "num_layers" in overrides:
            total = overrides.pop("num_layers")
            overrides.setdefault("num_double", max(1, -(-total // 3)))
            overrides.setdefault("num_single", total - overrides["num_double"])
        if "in_channels" in overrides and "out_channels" not in overrides:
            overrides["out_channels"] = min(self.out_channels, overrides["in_channels"])
        return overrides


PRESETS = {
    "flux.1-dev": FluxConfig(guidance_embed=True),
    "flux.1-schnell": FluxConfig(guidance_embed=False),
}


def rope_angles(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (L, n_axes) -> cos, sin (L, head_dim/2); axes concatenated, computed in float64."""
    angles = []
    for a, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, a, None].double() * omega[None])  # (L, d/2)
    phi = torch.cat(angles, dim=-1)
    return phi.cos().float(), phi.sin().float()


def image_ids(h: int, w: int, device, index: int = 0) -> torch.Tensor:
    """(h*w, 3) ids (index, row, col) of the packed grid, row-major; index 0 is the image being
    denoised, 1, 2, ... Kontext reference images."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=1).float()


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, 2h, 2w) -> tokens (B, h*w, 4C) of 2x2 patches, in (c, ph, pw) order."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, 4 * C)


class QKNorm(nn.Module):
    """Learned per-head RMSNorm scales (BFL names: query_norm.scale, key_norm.scale)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = nn.Module()
        self.query_norm.scale = nn.Parameter(torch.ones(head_dim))
        self.key_norm = nn.Module()
        self.key_norm.scale = nn.Parameter(torch.ones(head_dim))

    def __call__(self, q, k, cos, sin):
        return qk_norm_rope(q, k, self.query_norm.scale, self.key_norm.scale, cos, sin)


class StreamAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, h, cos, sin):
        """h (B, L, D) -> q, k, v each (B, H, L, Dh), q and k normed and rotated."""
        q, k, v = split_heads(self.qkv(h), self.heads)
        q, k = self.norm(q, k, cos, sin)
        return q, k, v.transpose(1, 2)


class ModulationLinear(nn.Module):
    """SiLU(vec) -> Linear(D, n*D) (BFL name: lin): vec (B, D) -> the n adaLN vectors (B, n*D)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joint attention [text ; image]."""

    def __init__(self, config: FluxConfig, img_mod: nn.Module | None = None, txt_mod: nn.Module | None = None):
        """``img_mod`` / ``txt_mod``: where each stream's 6 adaLN vectors come from (default: its
        own ``ModulationLinear``; Chroma: rows of its approximator's output)."""
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        hidden = int(dim * config.mlp_ratio)
        self.img_mod = ModulationLinear(dim, 6) if img_mod is None else img_mod
        self.txt_mod = ModulationLinear(dim, 6) if txt_mod is None else txt_mod
        self.img_attn, self.txt_attn = StreamAttention(dim, heads), StreamAttention(dim, heads)
        self.img_mlp, self.txt_mlp = mlp(dim, hidden), mlp(dim, hidden)

    def modulated_input(self, img, txt, vec) -> torch.Tensor:
        """The image stream's first normalised, modulated input (TeaCache's probe)."""
        vec = vec[0] if isinstance(vec, tuple) else vec
        msa, _ = modulations(self.img_mod(vec), 6)
        return norm_modulate(img, msa.shift, msa.scale)

    def forward(self, img, txt, vec, cos, sin, rows: BlockRows = PLAIN):
        """img (B, N, D), txt (B, L, D), vec (B, D), cos/sin (L + N, Dh/2) -> (img, txt).

        vec is what ``img_mod`` / ``txt_mod`` take, or ``(vec, mask)`` with a text padding mask
        (B, 1, 1, L + N) bool, True = attend (Chroma)."""
        vec, mask = vec if isinstance(vec, tuple) else (vec, None)
        return double_stream(self, img, txt, self.img_mod(vec), self.txt_mod(vec), cos, sin, rows, mask)


def double_stream(block: nn.Module, img, txt, img_mod, txt_mod, cos, sin, rows: BlockRows = PLAIN, mask=None):
    """The double block given each stream's 6 adaLN vectors, img_mod / txt_mod (B, 6D): FLUX.1 makes
    them per block, FLUX.2 once for all blocks. ``block`` holds img_attn, txt_attn, img_mlp, txt_mlp."""
    L = txt.shape[1]
    img_msa, img_mlp = modulations(img_mod, 6)
    txt_msa, txt_mlp = modulations(txt_mod, 6)
    qi, ki, vi = block.img_attn.qkv_heads(norm_modulate(img, img_msa.shift, img_msa.scale), cos[L:], sin[L:])
    qt, kt, vt = block.txt_attn.qkv_heads(norm_modulate(txt, txt_msa.shift, txt_msa.scale), cos[:L], sin[:L])
    a = rows.attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), text=L, mask=mask)
    at, ai = a.split([L, img.shape[1]], dim=1)
    img = gated_residual(img, block.img_attn.proj(ai), img_msa.gate)  # img + gate * attn
    txt = gated_residual(txt, block.txt_attn.proj(at), txt_msa.gate)
    img = rows.residual(img, block.img_mlp(norm_modulate(img, img_mlp.shift, img_mlp.scale)), img_mlp.gate, "image")
    txt = rows.residual(txt, block.txt_mlp(norm_modulate(txt, txt_mlp.shift, txt_mlp.scale)), txt_mlp.gate, "text")
    return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text ; image]: fused qkv + MLP-in (linear1), fused out (linear2)."""

    def __init__(self, config: FluxConfig, modulation: nn.Module | None = None):
        """``modulation``: where the block's 3 adaLN vectors come from (default: its own Linear)."""
        super().__init__()
        dim, self.heads = config.hidden_size, config.num_heads
        self.mlp_hidden = int(dim * config.mlp_ratio)
        self.modulation = ModulationLinear(dim, 3) if modulation is None else modulation
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // self.heads)

    def forward(self, x, vec, cos, sin, text_len: int, rows: BlockRows = PLAIN):
        """x (B, L + N, D): ``text_len`` text tokens, then the image's -> (B [+ forked], L + N, D);
        vec as in ``DoubleStreamBlock``."""
        vec, mask = vec if isinstance(vec, tuple) else (vec, None)
        (mod,) = modulations(self.modulation(vec), 3)
        qkv, h = self.linear1(norm_modulate(x, mod.shift, mod.scale)).split([3 * x.shape[-1], self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k, cos, sin)
        a = rows.attention(q, k, v.transpose(1, 2), text=text_len, mask=mask)
        return rows.residual(x, self.linear2(torch.cat([a, gelu_tanh(h)], dim=-1)), mod.gate, "joint", text_len)


class FluxTransformer(Transformer):
    """``v = model(x, sigma, context, pooled, guidance)``: x (B, C, H, W), sigma (B,) in [0, 1].

    The 2x2 packing, the position ids and the RoPE angles are internal.
    """

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.pooled_dim, dim)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, dim)
        self.txt_in = nn.Linear(config.context_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.num_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.num_single))
        self.final_layer = FinalLayer(dim, config.out_channels)
        self.ma = None

    def velocity(self, x, sigma, context, pooled, guidance=None, *, rows: RowPlan):
        """x (B, C, H, W), sigma (B,) and guidance (B,) float32 (or None), context (B, L, Dc),
        pooled (B, Dp); ``rows`` says what each block does to which rows. Returns (B', out_channels/4, H, W).

        C is in_channels/4: the latents, then any conditioning channels (Fill: masked-image
        latents and the mask; Depth / Canny: the control latents). Kontext: C may add k more
        groups of out_channels/4 channels, k reference images' latents at the same size, which
        become image tokens of their own (ids (j, row, col), j = 1..k) in every block and are
        not part of the output. Every token travels with its row, so forked rows carry them.
        """
        B, C, H, W = x.shape
        cfg = self.config
        if context.shape[-1] != cfg.context_dim or pooled.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}) and pooled (B, {cfg.pooled_dim}), "
                             f"got {tuple(context.shape)} and {tuple(pooled.shape)}")
        if H % 2 or W % 2:
            raise ValueError(f"FLUX latents are packed 2x2: latent size {H}x{W} must be even "
                             "(image size a multiple of 16)")
        c_in, c_out = cfg.in_channels // 4, cfg.out_channels // 4
        refs, rest = divmod(C - c_in, c_out)
        if C < c_in or rest or (refs and c_in != c_out):
            more = f" (+ {c_out} per Kontext reference image)" if c_in == c_out else ""
            raise ValueError(f"expected {c_in} input channels{more}, got {C}")
        h, w = H // 2, W // 2
        img = pack(x[:, :c_in] if refs else x)
        vec = self.time_in(timestep_embedding(1000 * sigma.to(x.dtype)).to(x.dtype))
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (FLUX.1-dev): pass guidance, e.g. 3.5")
            guidance = per_row(guidance, B, x)
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance.to(x.dtype)).to(x.dtype))
        vec = vec + self.vector_in(pooled)
        ids = [image_ids(h, w, x.device)]
        if refs:  # Kontext: reference tokens after the image's, (B, N + k*N, 4 * c_in)
            img = torch.cat([img, *(pack(x[:, c_in + j * c_out:c_in + (j + 1) * c_out]) for j in range(refs))], 1)
            ids += [image_ids(h, w, x.device, j + 1) for j in range(refs)]
        img, txt = self.img_in(img), self.txt_in(context)
        ids = [shard_tokens(torch.zeros(txt.shape[1], 3, device=x.device), "text", 0),
               shard_tokens(torch.cat(ids), "image", 0)]
        img, txt = shard_tokens(img, "image"), shard_tokens(txt, "text")  # sequence parallel: this rank's tokens
        L = txt.shape[1]
        ids = torch.cat(ids)
        cos, sin = rope_angles(ids, cfg.axes_dim, cfg.theta)
        (img, txt), vec = rows.run_blocks(self.double_blocks, (img, txt), vec, cos, sin)
        joint = torch.cat([txt, img], dim=1)
        (joint,), vec = rows.run_blocks(self.single_blocks, (joint,), vec, cos, sin, L, start=cfg.num_double)
        img = gather_tokens(joint[:, L:])[:, :h * w]  # the image's tokens only (sequence parallel: from every rank)
        out = self.final_layer(img, vec)  # (B', h*w, 4 * c_out)
        out = out.view(-1, h, w, c_out, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(-1, c_out, H, W)
