"""Decoder-only language models as text encoders: Mistral-Small-3.x (FLUX.2 [dev]), Qwen3
(FLUX.2 [klein]), and the language models of Qwen2.5-VL (Qwen-Image) and Qwen3-VL (Qwen-Image 2.1).

One Llama-style pre-norm decoder; the families differ only in data (:class:`DecoderLMConfig`):
q/k/v biases (Qwen2.5), a per-head RMSNorm on q and k before RoPE (Qwen3, Qwen3-VL), the RMS
eps and the RoPE base. Module names are transformers' names of the *language model* (what
follows ``model.language_model.`` / ``model.`` in the hub files), so checkpoints load by
stripping a prefix (see ``mmdit.weights.decoder_lm``).

* RoPE is the rotate-half (NeoX) convention over positions 0..L-1, whatever the padding, as
  transformers computes it. The VL models' multimodal RoPE (M-RoPE, interleaved for Qwen3-VL)
  gives every axis the same position for text-only prompts, which is this 1-D RoPE.
* Attention is causal, GQA, with an optional key-padding mask. A query row whose keys are all
  masked (the left padding of a left-padded batch) gets a zero attention output, as
  transformers' default SDPA path gives on the CPU; we zero it explicitly so no backend's
  handling of fully masked rows matters.
* Precision as transformers: RMSNorm in fp32, cast back, then times the weight; RoPE's cos and
  sin computed in fp32 and applied in the activation dtype.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderLMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # GQA: query head h reads key/value head h // (num_heads // num_kv_heads)
    head_dim: int = 128  # q_proj is num_heads * head_dim wide, which need not equal hidden_size
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    qkv_bias: bool = False  # Qwen2.5: q/k/v projections have biases (o_proj and the MLP do not)
    qk_norm: bool = False  # Qwen3 / Qwen3-VL: RMSNorm(head_dim) on every q and k head, before RoPE
    final_norm: bool = True  # False: a file cut after the layers FLUX.2 reads carries no norm.weight

    def __post_init__(self):
        sizes = (self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                 self.num_kv_heads, self.head_dim)
        if min(sizes) < 1:
            raise ValueError(f"decoder LM sizes must be >= 1: {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")


DECODER_LM_PRESETS: dict[str, DecoderLMConfig] = {
    # FLUX.2 [dev]: the text model of Mistral3ForConditionalGeneration (Small 3.1 / 3.2 24B)
    "mistral-small-3.1-24b": DecoderLMConfig(vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                                             num_layers=40, num_heads=32, num_kv_heads=8, rms_eps=1e-5,
                                             rope_theta=1e9),
    # FLUX.2 [klein] 4B / 9B: Qwen3ForCausalLM
    "qwen3-4b": DecoderLMConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                                num_heads=32, num_kv_heads=8, qk_norm=True),
    "qwen3-8b": DecoderLMConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                                num_heads=32, num_kv_heads=8, qk_norm=True),
    # Qwen-Image 1.0: language model of Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": DecoderLMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                     num_heads=28, num_kv_heads=4, qkv_bias=True),
    # Qwen-Image 2.1: language model of Qwen3-VL-8B-Instruct (same shapes as Qwen3-8B, RoPE base 5e6)
    "qwen3-vl-8b": DecoderLMConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                                   num_heads=32, num_kv_heads=8, rope_theta=5e6, qk_norm=True),
}


def decoder_lm_config(name: str, **overrides) -> DecoderLMConfig:
    if name not in DECODER_LM_PRESETS:
        raise ValueError(f"unknown decoder LM preset {name!r}; choose one of {sorted(DECODER_LM_PRESETS)}")
    return dataclasses.replace(DECODER_LM_PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # cast back before the weight, as transformers does


def rope_tables(cfg: DecoderLMConfig, L: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) for positions 0..L-1, in ``like``'s dtype (computed in fp32)."""
    half = torch.arange(0, cfg.head_dim, 2, device=like.device, dtype=torch.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** half)  # (hd/2,)
    angles = torch.arange(L, device=like.device, dtype=torch.float32)[:, None] * inv_freq  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd): rotate-half pairs channel j with j + hd/2
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, L, hd): x * cos + rotate_half(x) * sin."""
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def padding_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) 1 = token, 0 = pad -> (allowed (B, 1, L, L) bool for SDPA, live (B, 1, L, 1) bool).

    ``allowed`` is causal AND key is a token; a query row with no allowed key (left padding)
    is opened to all keys so SDPA stays finite, and ``live`` then zeroes its output."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()  # (L, L)
    allowed = causal & mask.bool()[:, None, None, :]  # (B, 1, L, L)
    live = allowed.any(dim=-1, keepdim=True)  # (B, 1, L, 1)
    return allowed | ~live, live


class Attention(nn.Module):
    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.cfg = cfg
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, D, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, L, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, L, cfg.num_heads, cfg.head_dim)  # (B, L, nh, hd)
        k = self.k_proj(x).view(B, L, cfg.num_kv_heads, cfg.head_dim)  # (B, L, nkv, hd)
        v = self.v_proj(x).view(B, L, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        groups = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, L, hd)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            allowed, live = mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) * live  # (B, nh, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """ids (B, L) [+ mask (B, L), 1 = token] -> hidden states; no LM head.

    ``hidden_states(ids, mask, layers)`` counts like transformers' ``hidden_states``: 0 is the
    embedding output, k the output of decoder layer k (1-based), all before the final norm;
    layers after the last one asked for are not run. ``forward`` is ``last_hidden_state``:
    the last layer's output after the final norm.
    """

    def __init__(self, cfg: DecoderLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps) if cfg.final_norm else None

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
                      layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """[hidden_states[k] for k in layers], each (B, L, hidden_size); -1 means num_layers."""
        n = self.config.num_layers
        wanted = [n if k == -1 else k for k in layers]
        bad = [k for k in wanted if not 0 <= k <= n]
        if bad or not wanted:
            raise ValueError(f"hidden-state indices must be in 0..{n} (0 = embeddings, k = output of layer k) "
                             f"or -1 for the last layer; got {list(layers)}")
        x = self.embed_tokens(ids)  # (B, L, D)
        rope = rope_tables(self.config, ids.shape[1], x)
        attn_mask = None if mask is None else padding_mask(mask)
        states = [x]
        for layer in self.layers[:max(wanted)]:
            x = layer(x, rope, attn_mask)
            states.append(x)
        return [states[k] for k in wanted]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is None:
            raise ValueError("this decoder LM was loaded without its final norm (a truncated file or "
                             "num_layers=...); use hidden_states(ids, mask, layers) for pre-norm states")
        last, = self.hidden_states(ids, mask, (self.config.num_layers,))
        return self.norm(last)  # (B, L, D)
