"""FLUX.2 ([dev], [klein] 4B / 9B). Module names follow the BFL checkpoints.

What changed from FLUX.1: no biases anywhere; one adaLN modulation shared by all double blocks
(per stream) and one by all single blocks, computed once per forward from the time (+ guidance)
embedding, with no pooled text vector; SwiGLU MLPs (SiLU on the first half); 4-axis RoPE
(t, row, col, text position), theta 2000; the latent is patchified outside the model, one
token per position of a 128-channel grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import norm_modulate
from .attention import gather_tokens, shard_tokens
from .base import Transformer
from .flux import QKNorm, double_stream, rope_angles
from .layers import modulations, rope_axes, split_heads, timestep_embedding
from .rows import PLAIN, BlockRows, RowPlan, per_row

REF_INDEX = 10  # reference image i (0-based) has time id REF_INDEX * (i + 1)


@dataclass(frozen=True)
class Flux2Config:
    """FLUX.2: double-stream blocks, then single-stream blocks, shared modulations, 4-axis RoPE."""

    num_double: int = 8
    num_single: int = 48
    num_heads: int = 48
    head_dim: int = 128
    in_channels: int = 128  # 32 VAE latent channels patchified 2x2 (outside the model)
    context_dim: int = 15360  # 3 stacked LLM hidden states: Mistral 3 x 5120, Qwen3-4B 3 x 2560, -8B 3 x 4096
    guidance_embed: bool = True  # [dev] is guidance-distilled; [klein] has no guidance input
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE split of head_dim: (time, row, col, text position)
    theta: int = 2000
    mlp_ratio: float = 3.0
    family: str = field(default="flux2", init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", rope_axes(self.axes_dim, self.head_dim, 4))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def patch_size(self) -> int:
        """Latent positions per token along each axis: 1 (the VAE's side patchifies 2x2 into channels)."""
        return 1

    @property
    def out_channels(self) -> int:
        """The output has the input's channels (one token per position, no packing)."""
        return self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def total_blocks(self) -> int:
        return self.num_double + self.num_single

    def adjust(self, overrides: dict) -> dict:
        """Overrides of a preset, completed: ``num_layers`` is the total, split in the preset's
        proportion (at least one double block); a new ``head_dim`` alone splits into 4 equal axes."""
        if "num_layers" in overrides:
            total = overrides.pop("num_layers")
            overrides.setdefault("num_double", max(1, round(total * self.num_double / self.total_blocks)))
            overrides.setdefault("num_single", total - overrides["num_double"])
        if "head_dim" in overrides and "axes_dim" not in overrides and overrides["head_dim"] % 8 == 0:
            overrides["axes_dim"] = (overrides["head_dim"] // 4,) * 4
        return overrides


PRESETS = {
    "flux.2-dev": Flux2Config(),
    "flux.2-klein-4b": Flux2Config(num_double=5, num_single=20, num_heads=24, context_dim=7680, guidance_embed=False),
    "flux.2-klein-9b": Flux2Config(num_double=8, num_single=24, num_heads=32, context_dim=12288, guidance_embed=False),
}


def grid_ids(h: int, w: int, device, t: int = 0) -> torch.Tensor:
    """(h*w, 4) ids (t, row, col, 0) of a latent grid, row-major; t 0 is the image being denoised,
    10, 20, ... the reference images."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zero = torch.zeros_like(rows)
    return torch.stack([zero + t, rows, cols, zero], dim=1)


def text_ids(L: int, device) -> torch.Tensor:
    """(L, 4) ids (0, 0, 0, l) of the text tokens."""
    pos = torch.arange(L, device=device)
    zero = torch.zeros_like(pos)
    return torch.stack([zero, zero, zero, pos], dim=1)


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """(..., 2M) -> (..., M): SiLU of the first half times the second."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def forward(self, h):
        return swiglu(h)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, no biases (BFL names: in_layer, out_layer)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer, self.out_layer = linear(in_dim, dim), linear(dim, dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """The shared adaLN linear: SiLU(vec) (B, D) -> (B, n*D) (BFL name: lin)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.lin = linear(dim, n * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))


class StreamAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = linear(dim, dim)

    def qkv_heads(self, h, cos, sin):
        """h (B, L, D) -> q, k, v each (B, H, L, Dh), q and k normed and rotated."""
        q, k, v = split_heads(self.qkv(h), self.heads)
        q, k = self.norm(q, k, cos, sin)
        return q, k, v.transpose(1, 2)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(linear(dim, 2 * hidden), SwiGLU(), linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joint attention [text ; image]; the
    modulation comes in (``cond``), it has none of its own."""

    def __init__(self, config: Flux2Config):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.img_attn, self.txt_attn = StreamAttention(dim, heads), StreamAttention(dim, heads)
        self.img_mlp, self.txt_mlp = mlp(dim, config.mlp_hidden), mlp(dim, config.mlp_hidden)

    def modulated_input(self, img, txt, cond) -> torch.Tensor:
        """The image stream's first normalised, modulated input (TeaCache's probe)."""
        msa, _ = modulations(cond[0], 6)
        return norm_modulate(img, msa.shift, msa.scale)

    def forward(self, img, txt, cond, cos, sin, rows: BlockRows = PLAIN):
        """img (B, N, D), txt (B, L, D), cond (mod_img (B, 6D), mod_txt (B, 6D), ...),
        cos/sin (L + N, Dh/2) -> (img, txt)."""
        return double_stream(self, img, txt, cond[0], cond[1], cos, sin, rows)


class SingleStreamBlock(nn.Module):
    """One stream over [text ; image]: linear1 gives q, k, v and the SwiGLU input, linear2 maps
    cat(attention, SwiGLU) back; the modulation comes in (``cond``)."""

    def __init__(self, config: Flux2Config):
        super().__init__()
        dim, self.heads, self.mlp_hidden = config.hidden_size, config.num_heads, config.mlp_hidden
        self.linear1 = linear(dim, 3 * dim + 2 * self.mlp_hidden)
        self.linear2 = linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // self.heads)

    def forward(self, x, cond, cos, sin, text_len: int, rows: BlockRows = PLAIN):
        """x (B, L + N, D): ``text_len`` text tokens, then the image's; cond (..., mod (B, 3D), ...)
        -> (B [+ forked], L + N, D)."""
        (mod,) = modulations(cond[2], 3)
        qkv, h = self.linear1(norm_modulate(x, mod.shift, mod.scale)).split(
            [3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k, cos, sin)
        a = rows.attention(q, k, v.transpose(1, 2), text=text_len)
        return rows.residual(x, self.linear2(torch.cat([a, swiglu(h)], dim=-1)), mod.gate, "joint", text_len)


class FinalLayer(nn.Module):
    """adaLN (shift, scale), no bias, then the projection to the latent channels."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear(dim, 2 * dim))
        self.linear = linear(dim, out_features)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # original order: (shift, scale)
        return self.linear(norm_modulate(x, shift, scale))


class Flux2Transformer(Transformer):
    """``v = model(x, sigma, context, guidance=None, refs=None)``: x (B, 128, h, w) the patchified
    latent grid, sigma (B,) in [0, 1]; the output has x's shape."""

    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = linear(config.in_channels, dim)
        self.txt_in = linear(config.context_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, dim)
        self.double_stream_modulation_img = Modulation(dim, 6)
        self.double_stream_modulation_txt = Modulation(dim, 6)
        self.single_stream_modulation = Modulation(dim, 3)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.num_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.num_single))
        self.final_layer = FinalLayer(dim, config.in_channels)
        self.ma = None

    def velocity(self, x, sigma, context, guidance=None, refs=None, *, rows: RowPlan):
        """x (B, C, h, w), sigma (B,) and guidance (B,) float32 (or None), context (B, L, Dc);
        refs: None or a tuple of reference latents (B or 1, C, h_i, w_i) (editing), which become
        image tokens of their own after the image's (ids (10 (i + 1), row, col, 0)) in every
        block and are not part of the output; every token travels with its row, so forked rows
        carry them. ``rows`` says what each block does to which rows. Returns (B', C, h, w)."""
        B, C, h, w = x.shape
        cfg = self.config
        if C != cfg.in_channels or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"this model takes x (B, {cfg.in_channels}, h, w) and context (B, L, {cfg.context_dim}), "
                             f"got {tuple(x.shape)} and {tuple(context.shape)}")
        refs = () if refs is None else tuple(refs)
        for r in refs:
            if r.dim() != 4 or r.shape[1] != C or r.shape[0] not in (1, B):
                raise ValueError(f"a reference latent must be (B or 1, {C}, h_i, w_i), got {tuple(r.shape)}")
        img = x.flatten(2).transpose(1, 2)  # (B, h*w, C): one token per position
        ids = [grid_ids(h, w, x.device)]
        if refs:  # reference tokens after the image's, (B, N + sum N_i, C)
            img = torch.cat([img, *(r.expand(B, -1, -1, -1).flatten(2).transpose(1, 2) for r in refs)], 1)
            ids += [grid_ids(r.shape[2], r.shape[3], x.device, REF_INDEX * (i + 1)) for i, r in enumerate(refs)]
        vec = self.time_in(timestep_embedding(1000 * sigma.to(x.dtype)).to(x.dtype))
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.2 model is guidance-distilled ([dev]): pass guidance, e.g. 4.0")
            guidance = per_row(guidance, B, x)
            vec = vec + self.guidance_in(timestep_embedding(1000 * guidance.to(x.dtype)).to(x.dtype))
        # the shared modulations, once per call; they travel with the rows like vec (DG's fork copies them)
        cond = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec),
                self.single_stream_modulation(vec), vec)
        img, txt = self.img_in(img), self.txt_in(context)
        ids = torch.cat([shard_tokens(text_ids(txt.shape[1], x.device), "text", 0),
                         shard_tokens(torch.cat(ids), "image", 0)])
        img, txt = shard_tokens(img, "image"), shard_tokens(txt, "text")  # sequence parallel: this rank's tokens
        L = txt.shape[1]
        cos, sin = rope_angles(ids, cfg.axes_dim, cfg.theta)
        (img, txt), cond = rows.run_blocks(self.double_blocks, (img, txt), cond, cos, sin)
        joint = torch.cat([txt, img], dim=1)
        (joint,), cond = rows.run_blocks(self.single_blocks, (joint,), cond, cos, sin, L, start=cfg.num_double)
        img = gather_tokens(joint[:, L:])[:, :h * w]  # the image's tokens only (sequence parallel: from every rank)
        out = self.final_layer(img, cond[3])  # (B', h*w, C)
        return out.transpose(1, 2).reshape(-1, C, h, w)

