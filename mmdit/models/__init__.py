"""The transformers, one file per family, and what they share.

    config.py     PRESETS, the official sizes of every family, as data; ``preset()``
    layers.py     embedders, adaLN modulations, the final layer
    attention.py  joint attention, PAG's identity rows, the token layout of sequence parallel
    rows.py       which rows each block runs: DG's fork, SLG's skipped and PAG's perturbed rows
    base.py       what every family shares: ``model.ma`` and ``forward`` -> the family's ``velocity``
    sd3.py        SD3 / SD3.5 (MMDiT, MMDiT-X): its config, presets and model
    flux.py       FLUX.1 (dev, schnell, Fill, Depth, Canny, Kontext): the same
    flux2.py      FLUX.2 ([dev], [klein] 4B / 9B): the same
    qwen_image.py    Qwen-Image 1.0 (double stream, text padding mask, 3-axis RoPE)
    qwen_image21.py  Qwen-Image 2.1 (single stream, block-causal, condition images)
    chroma.py     Chroma: FLUX.1's blocks, modulated by one small MLP (the approximator)

A new family is a new file here (config dataclass, PRESETS, model) and one line in ``MODELS``
and in ``config.PRESETS``; its checkpoints are a new file in ``weights/families/``.
"""
from __future__ import annotations

import torch
from torch import nn

from .chroma import ChromaConfig, ChromaTransformer
from .config import preset
from .flux import FluxConfig, FluxTransformer
from .flux2 import Flux2Config, Flux2Transformer
from .qwen_image import QwenImageConfig, QwenImageTransformer
from .qwen_image21 import QwenImage21Config, QwenImage21Transformer
from .sd3 import SD3Config, SD3Transformer

MODELS = {SD3Config: SD3Transformer, FluxConfig: FluxTransformer, Flux2Config: Flux2Transformer,  # config -> model
          QwenImageConfig: QwenImageTransformer, QwenImage21Config: QwenImage21Transformer,
          ChromaConfig: ChromaTransformer}


def transformer_for(config) -> nn.Module:
    """The model for a config (not initialised beyond torch defaults)."""
    if type(config) not in MODELS:
        raise ValueError(f"no model for a {type(config).__name__}; known configs: {[c.__name__ for c in MODELS]}")
    return MODELS[type(config)](config)


def build_transformer(name_or_config, *, device=None, dtype=None,
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
