"""Architecture configs: one dataclass per family, presets as data."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SD3Config:
    """SD3 / SD3.5 MMDiT (and MMDiT-X with dual attention)."""

    num_layers: int = 24
    num_heads: int = 24
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # the stored table is (1, M*M, hidden), centre-cropped per image
    context_dim: int = 4096  # T5 width; CLIP features are zero-padded to it
    pooled_dim: int = 2048  # CLIP-L pooled (768) ++ CLIP-G projected (1280)
    qk_norm: bool = False  # RMSNorm(head_dim) on q and k (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X: extra image-only attention
    mlp_ratio: float = 4.0
    family: str = field(default="sd3", init=False)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(self.dual_attention_layers)))
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")
        if self.num_layers < 1 or self.num_heads < 1 or self.head_dim < 1:
            raise ValueError(f"num_layers={self.num_layers}, num_heads={self.num_heads}, "
                             f"head_dim={self.head_dim} must all be >= 1")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def total_blocks(self) -> int:
        return self.num_layers


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


PRESETS: dict[str, SD3Config | FluxConfig] = {
    "sd3-medium": SD3Config(num_layers=24, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": SD3Config(num_layers=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                              dual_attention_layers=tuple(range(13))),
    "sd3.5-large": SD3Config(num_layers=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
    "flux.1-dev": FluxConfig(guidance_embed=True),
    "flux.1-schnell": FluxConfig(guidance_embed=False),
}


def preset(name: str, **overrides) -> SD3Config | FluxConfig:
    """A preset by name, with any field overridden (e.g. ``num_layers=2``).

    For SD3 presets ``num_layers`` also trims ``dual_attention_layers`` to the new depth;
    for FLUX presets ``num_layers`` is accepted as the total and split like the original
    (a third double blocks, rounded up) unless ``num_double`` / ``num_single`` are given.
    """
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[key]
    names = {f.name for f in dataclasses.fields(base) if f.init}
    if isinstance(base, FluxConfig) and "num_layers" in overrides:
        total = overrides.pop("num_layers")
        overrides.setdefault("num_double", max(1, -(-total // 3)))
        overrides.setdefault("num_single", total - overrides["num_double"])
    if isinstance(base, SD3Config) and "num_layers" in overrides and "dual_attention_layers" not in overrides:
        overrides["dual_attention_layers"] = tuple(i for i in base.dual_attention_layers
                                                   if i < overrides["num_layers"])
    if isinstance(base, FluxConfig) and "in_channels" in overrides and "out_channels" not in overrides:
        # narrower latents (a test model) narrow the output too; wider inputs (Fill, Depth) keep it
        overrides["out_channels"] = min(base.out_channels, overrides["in_channels"])
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}; "
                         f"valid fields: {sorted(names)}")
    return dataclasses.replace(base, **overrides)
