"""CLIP text tower: OpenAI CLIP-L/14 and OpenCLIP bigG/14, as SD3 and FLUX use them.

Pre-LN transformer with learned positions and a causal mask. Module names follow
transformers' ``CLIPTextModel`` (flattened, transformers >= 5) so checkpoints load by
stripping prefixes only (see ``mmdit.weights.encoders``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # OpenAI CLIP-L: x*sigmoid(1.702x); OpenCLIP bigG: "gelu" (erf)
    eps: float = 1e-5
    projection_dim: int | None = 768  # bias-free text_projection; None: the model has none
    eos_token_id: int = 49407  # pooled = state at the first EOS; 2 (legacy configs) = at argmax(ids)

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"CLIP width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"CLIP activation {self.activation!r} is not one of {sorted(_ACTIVATIONS)}")
        if min(self.vocab_size, self.width, self.num_layers, self.mlp_dim, self.max_positions) < 1:
            raise ValueError(f"CLIP sizes must be >= 1: {self}")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}

CLIP_PRESETS: dict[str, CLIPConfig] = {
    "clip-l": CLIPConfig(),  # SD3 text_encoder / FLUX text_encoder (FLUX's has no projection)
    "clip-g": CLIPConfig(width=1280, num_layers=32, num_heads=20, mlp_dim=5120, activation="gelu",
                         projection_dim=1280),  # SD3 text_encoder_2
}


def clip_config(name: str, **overrides) -> CLIPConfig:
    if name not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; choose one of {sorted(CLIP_PRESETS)}")
    return dataclasses.replace(CLIP_PRESETS[name], **overrides)


@dataclass
class CLIPOutput:
    hidden: torch.Tensor  # (B, L, D) last layer after the final LN (transformers' last_hidden_state)
    penultimate: torch.Tensor  # (B, L, D) output of layer N-1, no final LN (hidden_states[-2]; SD3 uses it)
    pooled: torch.Tensor  # (B, D) final-LN state at the EOS token (pooler_output)
    projected: torch.Tensor | None  # (B, P) text_projection(pooled), None without a projection


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """ids (B, L) -> :class:`CLIPOutput`. No padding mask: SD3 and FLUX feed none (causal only)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.ModuleDict({
            "token_embedding": nn.Embedding(cfg.vocab_size, cfg.width),
            "position_embedding": nn.Embedding(cfg.max_positions, cfg.width),
        })
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_layers))})
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = (nn.Linear(cfg.width, cfg.projection_dim, bias=False)
                                if cfg.projection_dim is not None else None)

    def forward(self, ids: torch.Tensor) -> CLIPOutput:
        B, L = ids.shape
        if L > self.config.max_positions:
            raise ValueError(f"CLIP takes at most {self.config.max_positions} tokens, got {L}")
        pos = torch.arange(L, device=ids.device)
        x = self.embeddings["token_embedding"](ids) + self.embeddings["position_embedding"](pos)  # (B, L, D)
        prev = x
        for layer in self.encoder["layers"]:
            prev, x = x, layer(x)
        hidden = self.final_layer_norm(x)  # (B, L, D)
        if self.config.eos_token_id == 2:  # legacy configs: the EOS id is the largest id
            eos = ids.argmax(dim=-1)
        else:  # first EOS (the pad id may equal the EOS id)
            eos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(B, device=ids.device), eos]  # (B, D)
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPOutput(hidden=hidden, penultimate=prev, pooled=pooled, projected=projected)
