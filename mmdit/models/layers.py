"""Pieces the families share: the timestep embedding, embedder MLPs, adaLN modulations, the final layer."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import norm_modulate


def rope_axes(axes_dim, head_dim: int, count: int | None = None) -> tuple[int, ...]:
    """A config's RoPE split of head_dim as a tuple, checked: ``count`` (any number if None) even
    numbers summing to head_dim."""
    axes = tuple(axes_dim)
    if sum(axes) != head_dim or any(d % 2 for d in axes) or count not in (None, len(axes)):
        raise ValueError(f"axes_dim {axes} must be {'' if count is None else f'{count} '}even numbers summing "
                         f"to head_dim {head_dim}")
    return axes


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first: t (B,) -> (B, dim), fp32 (same as SD3, BFL, diffusers).

    ``scale`` multiplies the angles ``t * freq`` after the product (Qwen-Image 1.0 takes t in
    [0, 1] and scales by 1000 there: the same angles as ``1000 t``, rounded the way it rounds)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    if scale != 1.0:
        args = args * scale
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (FLUX names: in_layer, out_layer)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class SequentialEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (SD3 names: mlp.0, mlp.2)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.mlp(x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear projection to the output features."""

    def __init__(self, dim: int, out_features: int, modulation: nn.Module | None = None):
        """``modulation``: c -> (B, 2D) shift and scale (default: SiLU -> Linear; Chroma: approximator rows)."""
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if modulation is None else modulation
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # original order: (shift, scale)
        return self.linear(norm_modulate(x, shift, scale))


@dataclass
class Modulation:
    """One adaLN triple, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None


def modulations(params: torch.Tensor, n: int) -> list[Modulation]:
    """Split the adaLN linear output (B, n*D) into shift/scale(/gate) groups, original order."""
    chunks = params.chunk(n, dim=1)
    if n == 2:
        return [Modulation(chunks[0], chunks[1])]
    return [Modulation(*chunks[i:i + 3]) for i in range(0, n, 3)]


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, L, 3*H*Dh) -> q, k, v views, each (B, L, H, Dh)."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, heads, -1).unbind(2)
    return q, k, v


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")
