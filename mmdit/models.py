"""Build a transformer from a preset or a config."""
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
