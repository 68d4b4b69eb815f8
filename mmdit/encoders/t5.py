"""T5 v1.1 encoder (the T5-XXL text encoder of SD3 and FLUX).

RMSNorm (fp32 variance, no mean, no bias), attention without 1/sqrt(d) scaling plus a
bucketed relative-position bias computed in block 0 and shared by all blocks, gated-GELU
(tanh) feed-forward. Module names follow transformers' ``T5EncoderModel`` so checkpoints
load without renaming; ``shared`` is the token embedding (``encoder.embed_tokens`` is tied
to it in transformers).

fp16: as in transformers, ``wo`` may be kept in fp32 (see :meth:`T5Encoder.keep_wo_fp32`);
its output then promotes the residual stream to fp32, and fp16 activations are clamped.
Prefer bf16 or fp32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 10240
    num_buckets: int = 32  # relative-position buckets (bidirectional: half per direction)
    max_distance: int = 128  # distances beyond this share the last bucket
    eps: float = 1e-6

    def __post_init__(self):
        if min(self.vocab_size, self.d_model, self.num_layers, self.num_heads, self.d_kv, self.d_ff) < 1:
            raise ValueError(f"T5 sizes must be >= 1: {self}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"T5 num_buckets must be even and >= 4, got {self.num_buckets}")


T5_PRESETS: dict[str, T5Config] = {"t5-xxl": T5Config()}


def t5_config(name: str, **overrides) -> T5Config:
    if name not in T5_PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(T5_PRESETS)}")
    return dataclasses.replace(T5_PRESETS[name], **overrides)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel = key_pos - query_pos``: exact below num_buckets/4, log-spaced after."""
    num_buckets //= 2
    bucket = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(rel < max_exact, rel, large)


class T5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)  # fp32 variance whatever the input dtype
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, L: int, device) -> torch.Tensor:
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets,
                                           self.cfg.max_distance)  # (L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, nh, L, L)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.cfg.num_heads, -1).transpose(1, 2)  # (B, nh, L, d_kv)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5GatedFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        return self.wo(h.to(self.wo.weight.dtype))  # wo may be fp32 under fp16 (overflow)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedFF(cfg)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard: keep fp16 activations finite (a little below max once any is inf)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Encoder(nn.Module):
    """ids (B, L) -> last hidden state (B, L, d_model). SD3 / FLUX attend to the pads (no mask);
    Chroma passes the tokenizer's mask (B, L) (True / 1 = a real token), as transformers takes it."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict({
            "block": nn.ModuleList(T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers)),
            "final_layer_norm": T5RMSNorm(cfg.d_model, cfg.eps),
        })

    def keep_wo_fp32(self) -> T5Encoder:
        """Cast every ``wo`` to fp32 (what transformers does for fp16 T5)."""
        for block in self.encoder["block"]:
            block.layer[1].DenseReluDense.wo.float()
        return self

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        blocks = self.encoder["block"]
        x = self.shared(ids)  # (B, L, d_model)
        bias = blocks[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)  # (1, nh, L, L)
        if mask is not None:  # padded keys get the dtype's lowest value, as transformers adds it
            low = torch.finfo(bias.dtype).min
            bias = bias + torch.where(mask.to(ids.device)[:, None, None, :] != 0, 0.0, low).to(bias.dtype)
        for block in blocks:
            x = block(x, bias)
        return self.encoder["final_layer_norm"](x)
