"""Chroma (lodestones/Chroma1-HD, Chroma1-Base, ...): FLUX.1-schnell's blocks with every modulation
Linear removed. One small MLP, the approximator (``distilled_guidance_layer``), turns (sigma,
guidance 0, row index) into all 344 adaLN vectors at once; no CLIP, no pooled vector, no
``time_in`` / ``vector_in`` / ``guidance_in``. The text is T5 alone, with a padding mask.

The blocks are FLUX.1's (``flux.DoubleStreamBlock``, ``flux.SingleStreamBlock``, ``layers.FinalLayer``),
built with ``GivenModulation`` in place of their adaLN Linears. Module names are the official
checkpoint's (lodestone-rock/flow ``src/models/chroma``), so Chroma1-HD.safetensors loads as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import gather_tokens, shard_tokens
from .base import Transformer
from .flux import DoubleStreamBlock, SingleStreamBlock, image_ids, pack, rope_angles
from .layers import FinalLayer, MLPEmbedder, rope_axes, timestep_embedding
from .rows import RowPlan


@dataclass(frozen=True)
class ChromaConfig:
    """Chroma: FLUX.1's double / single blocks, modulated by the approximator's output rows."""

    num_double: int = 19
    num_single: int = 38
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int | None = None  # None: in_channels
    context_dim: int = 4096  # T5-XXL
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE split of head_dim: (unused, row, col)
    theta: int = 10000
    mlp_ratio: float = 4.0
    approximator_in: int = 64  # 16 timestep + 16 guidance + 32 row-index sinusoids
    approximator_hidden: int = 5120
    approximator_layers: int = 5
    family: str = field(default="chroma", init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", rope_axes(self.axes_dim, self.head_dim))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.in_channels % 4 or self.in_channels != self.out_channels:
            raise ValueError(f"in_channels={self.in_channels} and out_channels={self.out_channels} must be equal "
                             "multiples of 4 (2x2 packing)")
        if self.approximator_in % 8:
            raise ValueError(f"approximator_in={self.approximator_in} must be a multiple of 8: a quarter each for "
                             "the timestep and the guidance sinusoids, half for the row index, each of even width")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels // 4

    @property
    def total_blocks(self) -> int:
        return self.num_double + self.num_single

    @property
    def modulation_rows(self) -> int:
        """The approximator's output rows: 3 per single block, 6 + 6 per double block, 2 for the final layer."""
        return 3 * self.num_single + 12 * self.num_double + 2

    def adjust(self, overrides: dict) -> dict:
        """``num_layers`` is the total, split like FLUX.1 (a third double blocks, rounded up)."""
        if "num_layers" in overrides:
            total = overrides.pop("num_layers")
            overrides.setdefault("num_double", max(1, -(-total // 3)))
            overrides.setdefault("num_single", total - overrides["num_double"])
        if "in_channels" in overrides:
            overrides.setdefault("out_channels", overrides["in_channels"])
        return overrides


PRESETS = {"chroma": ChromaConfig()}  # Chroma1-HD / Chroma1-Base / chroma-unlocked-v*: one architecture


class RMSNorm(nn.Module):
    """RMSNorm with a learned ``scale`` (the approximator's norms), eps 1e-6 as the official model
    (diffusers uses torch's default eps: the dtype's machine epsilon)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), eps=1e-6).to(x.dtype)


class Approximator(nn.Module):
    """``distilled_guidance_layer``: in_proj, then residual ``x + MLP(RMSNorm(x))`` layers, then out_proj."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        hidden = config.approximator_hidden
        self.in_proj = nn.Linear(config.approximator_in, hidden)
        self.layers = nn.ModuleList(MLPEmbedder(hidden, hidden) for _ in range(config.approximator_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(config.approximator_layers))
        self.out_proj = nn.Linear(hidden, config.hidden_size)

    def forward(self, x):
        """x (B, K, approximator_in) -> (B, K, hidden_size)."""
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class GivenModulation(nn.Module):
    """A block's adaLN vectors taken from the approximator's output: rows ``start .. start + n``
    of (B, K, D) -> (B, n*D), what a FLUX ``ModulationLinear`` gives. No parameters."""

    def __init__(self, start: int, n: int):
        super().__init__()
        self.start, self.n = start, n

    def forward(self, mods):
        return mods[:, self.start:self.start + self.n].flatten(1)


def modulation_starts(config: ChromaConfig) -> dict[str, list[int]]:
    """The first approximator row of each consumer, in the official order (flow's
    ``distribute_modulations``): every single block (3 rows), then the double blocks' image
    streams (6), then their text streams (6), then the final layer (shift, scale)."""
    single, double = config.num_single, config.num_double
    return {"single": [3 * i for i in range(single)],
            "img": [3 * single + 6 * i for i in range(double)],
            "txt": [3 * single + 6 * double + 6 * i for i in range(double)],
            "final": [3 * single + 12 * double]}


class ChromaTransformer(Transformer):
    """``v = model(x, sigma, context, context_mask=None)``: x (B, 16, H, W) as FLUX.1, sigma (B,) in
    [0, 1], context (B, L, 4096) T5 states, context_mask (B, L) bool (True = attend; the pipeline
    keeps the prompt, its EOS and one pad token, as the official model was trained)."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        rows = modulation_starts(config)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.context_dim, dim)
        self.distilled_guidance_layer = Approximator(config)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(config, GivenModulation(i, 6), GivenModulation(t, 6))
            for i, t in zip(rows["img"], rows["txt"]))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config, GivenModulation(s, 3)) for s in rows["single"])
        self.final_layer = FinalLayer(dim, config.out_channels, GivenModulation(rows["final"][0], 2))
        self.ma = None

    def approximator_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma (B,) -> (B, K, approximator_in) float32: per row ``[t(sigma) | t(guidance 0) | t(row index)]``,
        sinusoids of 1000 x the value (BFL's ``timestep_embedding``, cosines first). 1000 x sigma is taken in
        sigma's dtype (the model's, as diffusers and FLUX.1 here do)."""
        K, quarter = self.config.modulation_rows, self.config.approximator_in // 4
        time = timestep_embedding(1000 * sigma, quarter)  # (B, quarter)
        guidance = timestep_embedding(torch.zeros_like(sigma), quarter)  # trained with guidance 0 only
        index = timestep_embedding(1000 * torch.arange(K, device=sigma.device, dtype=torch.float32), 2 * quarter)
        head = torch.cat([time, guidance], dim=1)[:, None].expand(-1, K, -1)  # (B, K, 2 * quarter)
        return torch.cat([head, index[None].expand(sigma.shape[0], -1, -1)], dim=-1)

    def velocity(self, x, sigma, context, context_mask=None, *, rows: RowPlan):
        """x (B, C, H, W), sigma (B,) float32, context (B, L, Dc), context_mask (B, L) bool or 0/1 (None:
        every token); ``rows`` says what each block does to which rows. Returns (B', C, H, W)."""
        B, C, H, W = x.shape
        cfg = self.config
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if C != cfg.latent_channels:
            raise ValueError(f"expected {cfg.latent_channels} latent channels, got {C}")
        if H % 2 or W % 2:
            raise ValueError(f"Chroma latents are packed 2x2: latent size {H}x{W} must be even "
                             "(image size a multiple of 16)")
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask must be (B, L) = {tuple(context.shape[:2])}, "
                             f"got {tuple(context_mask.shape)}")
        h, w = H // 2, W // 2
        # every adaLN vector of every block, once per input row (forked rows copy them)
        mods = self.distilled_guidance_layer(self.approximator_input(sigma.to(x.dtype)).to(x.dtype))  # (B, K, D)
        mask = None
        if context_mask is not None:  # keys: the kept text tokens and every image token
            keep = torch.cat([context_mask != 0, context_mask.new_ones(B, h * w, dtype=torch.bool)], dim=1)
            mask = keep[:, None, None, :]  # (B, 1, 1, L + N)
        img, txt = self.img_in(pack(x)), self.txt_in(context)
        ids = torch.cat([shard_tokens(torch.zeros(txt.shape[1], 3, device=x.device), "text", 0),
                         shard_tokens(image_ids(h, w, x.device), "image", 0)])
        img, txt = shard_tokens(img, "image"), shard_tokens(txt, "text")  # sequence parallel: this rank's tokens
        L = txt.shape[1]
        cos, sin = rope_angles(ids, cfg.axes_dim, cfg.theta)
        cond = (mods, mask)  # per row: copied with the rows a branch or the DG fork adds
        (img, txt), cond = rows.run_blocks(self.double_blocks, (img, txt), cond, cos, sin)
        joint = torch.cat([txt, img], dim=1)
        (joint,), cond = rows.run_blocks(self.single_blocks, (joint,), cond, cos, sin, L, start=cfg.num_double)
        img = gather_tokens(joint[:, L:])
        out = self.final_layer(img, cond[0])  # (B', h*w, 4 * c)
        c = cfg.latent_channels
        return out.view(-1, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, H, W)
