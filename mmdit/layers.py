"""Pieces shared by the SD3 and FLUX transformers: embedders, attention, the MA fork."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gated_residual, modulate


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first: t (B,) -> (B, dim), fp32 (same as SD3, BFL, diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
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

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # original order: (shift, scale)
        return self.linear(modulate(x, shift, scale))


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, H, L, Dh) -> (B, L, H*Dh)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


@dataclass
class Fork:
    """The MA disruption at the output of one block, as rows of the batch.

    rows: (B,) bool, the rows concerned. append: True for ``fork`` (copies of the rows are
    appended, disrupted), False for ``disrupt`` (the rows themselves are disrupted).
    rho: (n,) one factor per concerned row.
    """

    rows: torch.Tensor
    append: bool
    channels: torch.Tensor
    rho: torch.Tensor
    streams: tuple[str, ...]
    token_mask: torch.Tensor | None = None

    def residual(self, x, y, gate, stream: str, token_start: int = 0, text_len: int = 0):
        """``x + gate*y`` for one stream of the fork block, with this fork applied.

        ``stream`` is "image", "text" or "joint" (FLUX single blocks: ``text_len`` text
        tokens first, then image tokens).
        """
        touched = stream == "joint" or stream in self.streams
        if not touched:
            out = gated_residual(x, y, gate)
            return torch.cat([out, out[self.rows]]) if self.append else out
        mask = self.token_mask
        if stream == "joint":
            if "text" not in self.streams:
                token_start = text_len
            elif "image" not in self.streams:
                mask = torch.arange(x.shape[1], device=x.device) < text_len
            elif mask is not None:
                mask = torch.cat([torch.ones(text_len, dtype=torch.bool, device=mask.device), mask])
        elif stream == "text":
            mask = None
        out = gated_residual(x, y, gate, fork=self.rows, channels=self.channels, rho=self.rho,
                             token_start=token_start, token_mask=mask)
        if self.append:
            return out
        B = x.shape[0]
        return out[:B].index_copy(0, self.rows.nonzero().squeeze(1), out[B:])

    def extend(self, t: torch.Tensor) -> torch.Tensor:
        """The conditioning vector's rows after the fork block."""
        if not self.append:
            return t
        return torch.cat([t, t[self.rows]])


def plan_fork(spec, sigma: torch.Tensor, disrupt, fork, batch: int) -> tuple[Fork | None, int]:
    """The Fork to apply at block ``spec.block`` (or None) and that block index."""
    if disrupt is None and fork is None:
        return None, -1
    if spec is None:
        raise ValueError("disrupt/fork need an MA spec: set model.ma = mmdit.MASpec(channels, block) "
                         "or calibrate one with `mmdit calibrate-ma`")
    if disrupt is not None and fork is not None:
        raise ValueError("give either disrupt or fork, not both")
    rows = disrupt if disrupt is not None else fork
    rows = torch.as_tensor(rows, dtype=torch.bool, device=sigma.device)
    if rows.shape != (batch,):
        raise ValueError(f"{'disrupt' if disrupt is not None else 'fork'} must be a ({batch},) bool mask, "
                         f"got shape {tuple(rows.shape)}")
    if not rows.any():
        return None, -1
    channels = torch.tensor(spec.channels, dtype=torch.long, device=sigma.device)
    token_mask = None if spec.token_mask is None else spec.token_mask.to(sigma.device).bool()
    return Fork(rows, fork is not None, channels, spec.rho_for(sigma[rows]), spec.streams, token_mask), spec.block
