"""The transformers, one file per family, and what they share.

    config.py     one config dataclass per family; PRESETS, the official sizes, as data
    layers.py     embedders, adaLN modulations, the final layer
    attention.py  joint attention, PAG's identity rows, the token layout of sequence parallel
    rows.py       which rows each block runs: DG's fork, SLG's skipped and PAG's perturbed rows
    base.py       what every family shares: ``model.ma`` and ``forward`` -> the family's ``velocity``
    sd3.py        SD3 / SD3.5 (MMDiT, MMDiT-X)
    flux.py       FLUX.1 (dev, schnell, Fill, Depth, Canny, Kontext)
"""
from __future__ import annotations

import torch
from torch import nn

from .config import FluxConfig, SD3Config, preset
from .flux import FluxTransformer
from .sd3 import SD3Transformer


def transformer_for(config: SD3Config | FluxConfig) -> nn.Module:
    """The model class for a config (not initialised beyond torch defaults)."""
    return SD3Transformer(config) if isinstance(config, SD3Config) else FluxTransformer(config)


def build_transformer(name_or_config: str | SD3Config | FluxConfig, *, device=None, dtype=None,
                      **overrides) -> nn.Module:
    """A randomly initialised transformer from a preset name (``"sd3.5-medium"``) or config.

    Overrides replace config fields, e.g. ``build_transformer("flux.1-dev", num_layers=2)``.
    """
    if isinstance(name_or_config, str):
        config = preset(name_or_config, **overrides)
    elif overrides:
        raise ValueError("overrides apply to preset names; use dataclasses.replace(config, ...) for a config")
    else:
        config = name_or_config
    with torch.device(device or "cpu"):
        model = transformer_for(config)
    return model.to(dtype=dtype) if dtype is not None else model
