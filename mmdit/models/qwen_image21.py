"""Qwen-Image 2.1: a single-stream, block-causal DiT over [text with condition images ; target image].

Module names are the original checkpoint's (what diffusers'
``convert_qwen_image21_transformer_checkpoint_to_diffusers`` reads): diffusers' names except the
SwiGLU's gate and up projections, one fused ``img_mlp.gate_up`` (gate rows first). The text
norm's weight is stored as ``scale - 1`` (zero-centred), as in both layouts.

The sequence is the text (the VLM's states, each condition image's slots replaced by its latent
tokens), then the target image's tokens. Text is causal, each image block sees itself and all
before it; text and condition images are modulated from t = 0 (``causal_condition``), the target
from its sigma. So the model runs two streams with the same weights: the prefix (text and
condition images: DG's "text" stream) and the target ("image"); the prefix attends to the
prefix only, the target to everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gated_residual, norm_modulate, qk_norm_rope
from .base import Transformer
from .layers import gelu_tanh, rope_axes, timestep_embedding
from .qwen_image import TimeTextEmbed, Weight, clip_fp16, grid_positions, rope_angles, text_positions
from .rows import PLAIN, BlockRows, RowPlan

TOKENS_PER_SLOT = 4  # one VLM image slot stands for a 2x2 group of latent tokens


@dataclass(frozen=True)
class QwenImage21Config:
    """Qwen-Image 2.1 (``Qwen/Qwen-Image-2.1``): 32 single-stream blocks, 32 heads x 128."""

    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    in_channels: int = 64  # latent channels (one token per latent pixel: no packing)
    out_channels: int = 64
    context_dim: int = 4096  # Qwen3-VL-8B's hidden size
    mlp_ratio: int = 3  # SwiGLU hidden = mlp_ratio * hidden_size
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE split of head_dim: (frame, row, col)
    theta: int = 10000
    eps: float = 1e-6
    causal_condition: bool = True  # text and condition images modulated from t = 0
    family: str = field(default="qwen-image-2.1", init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", rope_axes(self.axes_dim, self.head_dim, 3))
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
        return self.in_channels

    def adjust(self, overrides: dict) -> dict:
        """Overrides of a preset, completed: narrower latents narrow the output too."""
        if "in_channels" in overrides and "out_channels" not in overrides:
            overrides["out_channels"] = overrides["in_channels"]
        return overrides


PRESETS = {"qwen-image-2.1": QwenImage21Config()}


class TextIn(nn.Module):
    """Zero-centred RMSNorm (``text_norm.weight`` = scale - 1), Linear, GELU(tanh), Linear."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.text_norm = Weight(context_dim, init=0.0)
        self.in_layer = nn.Linear(context_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, c):
        cf = c.float()
        h = cf * torch.rsqrt(cf.pow(2).mean(-1, keepdim=True) + self.eps) * (self.text_norm.weight.float() + 1)
        return self.out_layer(gelu_tanh(self.in_layer(h.to(c.dtype))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q, self.norm_k = Weight(head_dim), Weight(head_dim)

    def qkv(self, h, cos, sin, eps):
        """h (B, L, D) -> q, k, v each (B, H, L, Dh); q and k RMS-normed and rotated."""
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (self.to_q(h), self.to_k(h), self.to_v(h)))
        q, k = qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, cos, sin, eps)
        return q, k, v.transpose(1, 2)


class SwiGLU(nn.Module):
    """``out(silu(gate) * up)`` with gate and up as one Linear ``gate_up`` (gate rows first)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


class QwenImage21Block(nn.Module):
    """LN * (1 + scale) (no shift), attention, ``+ tanh(gate) * ...``; the same for the SwiGLU.
    The modulation is the model's (shared by every block), not the block's."""

    def __init__(self, config: QwenImage21Config):
        super().__init__()
        dim = config.hidden_size
        self.eps = config.eps
        self.attn = Attention(dim, config.num_heads)
        self.img_mlp = SwiGLU(dim, config.mlp_ratio * dim)

    def modulated_input(self, prefix, target, cond) -> torch.Tensor:
        """The image (target) stream's first normalised, modulated input (TeaCache's probe)."""
        scale = cond[0].chunk(4, dim=1)[0]
        return norm_modulate(target, scale.new_zeros(()).expand_as(scale), scale, self.eps)

    def forward(self, prefix, target, cond, causal, cos, sin, rows: BlockRows = PLAIN):
        """prefix (B, P, D): text and condition images; target (B, N, D); cond = (target
        modulation (B, 4D), prefix modulation (B, 4D), prefix key mask (B, 1, 1, P) or None, key
        mask (B, 1, 1, P + N) or None, the target's time embedding (B, D): for the final layer); causal (P, P) bool: the block-causal mask of the prefix;
        cos / sin (P + N, Dh / 2). -> (prefix, target)."""
        mod_t, mod_p, keys_p, keys, _ = cond
        P, eps = prefix.shape[1], self.eps
        s1t, g1t, s2t, g2t = mod_t.chunk(4, dim=1)
        s1p, g1p, s2p, g2p = mod_p.chunk(4, dim=1)
        no_shift = s1t.new_zeros(()).expand_as(s1t)
        qp, kp, vp = self.attn.qkv(norm_modulate(prefix, no_shift, s1p, eps), cos[:P], sin[:P], eps)
        qt, kt, vt = self.attn.qkv(norm_modulate(target, no_shift, s1t, eps), cos[P:], sin[P:], eps)
        mask_p = causal if keys_p is None else causal & keys_p
        ap = rows.attention(qp, kp, vp, text=P, mask=mask_p)  # the prefix never sees the target
        at = rows.attention(qt, torch.cat([kp, kt], 2), torch.cat([vp, vt], 2), text=0, key_text=P, mask=keys)
        prefix = gated_residual(prefix, self.attn.to_out[0](ap), g1p.tanh())
        target = gated_residual(target, self.attn.to_out[0](at), g1t.tanh())
        prefix = rows.residual(prefix, self.img_mlp(norm_modulate(prefix, no_shift, s2p, eps)), g2p.tanh(), "text")
        target = rows.residual(target, self.img_mlp(norm_modulate(target, no_shift, s2t, eps)), g2t.tanh(), "image")
        return clip_fp16(prefix), clip_fp16(target)


class NormOut(nn.Module):
    """The final adaptive norm: scale only (``linear``: D -> D, no bias, no shift)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x, temb, eps):
        scale = self.linear(F.silu(temb))
        return norm_modulate(x, scale.new_zeros(()).expand_as(scale), scale, eps)


class QwenImage21Transformer(Transformer):
    """``v = model(x, sigma, context, context_mask=None, images=(), image_slots=())``.

    x: (B, 64, H, W) target latents (one token per latent pixel); sigma: (B,) in [0, 1];
    context: (B, L, 4096) Qwen3-VL states (pre-final-norm) of the prompt, including the VLM's
    positions of the condition images' ``<|image_pad|>`` tokens; context_mask: (B, L) 1 = token,
    0 = padding; images: condition latents, each (B, 64, h_k, w_k), h_k * w_k a multiple of 4;
    image_slots: for each, the index in ``context`` of its first image slot: its
    ``h_k * w_k / 4`` slots are replaced by its latent tokens. Every row shares the layout.
    Returns the target's velocity (B', 64, H, W).
    """

    def __init__(self, config: QwenImage21Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.time_text_embed = TimeTextEmbed(dim, bias=False)
        self.txt_in = TextIn(config.context_dim, dim, config.eps)
        self.img_in = nn.Linear(config.in_channels, dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))
        self.transformer_blocks = nn.ModuleList(QwenImage21Block(config) for _ in range(config.num_layers))
        self.norm_out = NormOut(dim)
        self.proj_out = nn.Linear(dim, config.out_channels, bias=False)
        self.ma = None

    def _check(self, x, context, context_mask, images, image_slots):
        B, C = x.shape[:2]
        cfg, L = self.config, context.shape[1]
        if context.dim() != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if C != cfg.latent_channels:
            raise ValueError(f"this model takes {cfg.latent_channels} latent channels, got x of shape {tuple(x.shape)}")
        if context_mask is not None and context_mask.shape != (B, L):
            raise ValueError(f"context_mask must be ({B}, {L}) like the context, got {tuple(context_mask.shape)}")
        if len(images) != len(image_slots):
            raise ValueError(f"{len(images)} condition images but {len(image_slots)} image_slots: give one slot "
                             "index (the first <|image_pad|> position in the context) per image")
        end = 0
        for k, (img, start) in enumerate(zip(images, image_slots)):
            if img.dim() != 4 or img.shape[:2] != (B, C) or (img.shape[2] * img.shape[3]) % TOKENS_PER_SLOT:
                raise ValueError(f"condition image {k} must be ({B}, {C}, h, w) latents with h*w a multiple of "
                                 f"{TOKENS_PER_SLOT}, got {tuple(img.shape)}")
            slots = img.shape[2] * img.shape[3] // TOKENS_PER_SLOT
            if not end <= start <= L - slots:
                raise ValueError(f"condition image {k}'s {slots} slots from context position {start} do not fit: "
                                 f"they must follow the previous image's (from {end}) and end by {L}")
            end = start + slots

    def _prefix(self, txt, valid, images, image_slots):
        """The text states with each condition image's slots replaced by its tokens.

        txt (B, L, D), valid (B, L) bool or None -> prefix (B, P, D), positions (P, 3), the
        block-causal mask (P, P) (text causal, an image block all of itself), key mask (B, P) or
        None, and the RoPE position after the prefix (the target's frame)."""
        B, dev = txt.shape[0], txt.device
        pieces, pos, keys, spans = [], [], [], []
        at = cursor = tokens = 0  # the running RoPE position, the next context index, prefix tokens so far
        for img, start in zip(images, image_slots):
            h, w = img.shape[2:]
            n = start - cursor  # text tokens before the image
            pieces += [txt[:, cursor:start], self.img_in(img.flatten(2).transpose(1, 2))]
            pos += [text_positions(at, n, dev), grid_positions(h, w, at + n, dev)]
            if valid is not None:  # image tokens are always keys
                keys += [valid[:, cursor:start], valid.new_ones(B, h * w)]
            spans.append((tokens + n, tokens + n + h * w))
            at, tokens, cursor = at + n + max(h, w), tokens + n + h * w, start + h * w // TOKENS_PER_SLOT
        n = txt.shape[1] - cursor
        pieces.append(txt[:, cursor:])
        pos.append(text_positions(at, n, dev))
        prefix = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
        causal = torch.ones(tokens + n, tokens + n, dtype=torch.bool, device=dev).tril_()
        for a, b in spans:
            causal[a:b, a:b] = True
        key_mask = None if valid is None else torch.cat([*keys, valid[:, cursor:]], 1)
        return prefix, torch.cat(pos), causal, key_mask, at + n

    def velocity(self, x, sigma, context, context_mask=None, images=(), image_slots=(), *, rows: RowPlan):
        """See the class docstring; ``rows`` says what each block does to which rows."""
        images, image_slots = tuple(images or ()), tuple(int(s) for s in (image_slots or ()))
        self._check(x, context, context_mask, images, image_slots)
        B, C, H, W = x.shape
        cfg = self.config
        valid = None if context_mask is None else context_mask.bool()
        prefix, pos, causal, keys_p, frame = self._prefix(self.txt_in(context), valid, images, image_slots)
        target = self.img_in(x.flatten(2).transpose(1, 2))  # (B, H*W, D), row-major
        cos, sin = rope_angles(torch.cat([pos, grid_positions(H, W, frame, x.device)]), cfg.axes_dim, cfg.theta)
        keys_all = None
        if keys_p is not None:  # (B, 1, 1, keys): padded text is never attended
            keys_all = torch.cat([keys_p, keys_p.new_ones(B, H * W)], 1)[:, None, None]
            keys_p = keys_p[:, None, None]

        t = sigma.to(x.dtype)
        if cfg.causal_condition:
            t = torch.cat([t, t.new_zeros(1)])  # one more row at t = 0: the prefix's
        temb = self.time_text_embed.timestep_embedder(timestep_embedding(1000 * t.float()).to(x.dtype))
        mod = self.modulation(temb)  # (B [+ 1], 4D): scale1, gate1, scale2, gate2
        mod_p = mod[B:].expand(B, -1) if cfg.causal_condition else mod
        cond = (mod[:B], mod_p, keys_p, keys_all, temb[:B])
        (prefix, target), cond = rows.run_blocks(self.transformer_blocks, (prefix, target), cond, causal, cos, sin)
        out = self.proj_out(self.norm_out(target, cond[4], cfg.eps))  # (B', H*W, C_out)
        return out.transpose(1, 2).reshape(-1, cfg.out_channels, H, W)
