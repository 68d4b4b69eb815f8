"""The official sizes of every family, by name (``PRESETS``), and ``preset(name, **overrides)``.

Each family's config dataclass lives with its model (``sd3.SD3Config``, ``flux.FluxConfig``, ...);
a config's ``adjust`` completes overrides the way that family's shapes need.
"""
from __future__ import annotations

import dataclasses

from . import chroma, flux, flux2, qwen_image, qwen_image21, sd3
from .chroma import ChromaConfig
from .flux import FluxConfig
from .flux2 import Flux2Config
from .qwen_image import QwenImageConfig
from .qwen_image21 import QwenImage21Config
from .sd3 import SD3Config

PRESETS = {**sd3.PRESETS, **flux.PRESETS, **flux2.PRESETS, **qwen_image.PRESETS, **qwen_image21.PRESETS,
           **chroma.PRESETS}


def preset(name: str, **overrides):
    """A preset by name, with any field overridden (e.g. ``num_layers=2``; see the config's ``adjust``)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[key]
    names = {f.name for f in dataclasses.fields(base) if f.init}
    overrides = base.adjust(dict(overrides))
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for preset {name!r}; "
                         f"valid fields: {sorted(names)}")
    return dataclasses.replace(base, **overrides)


__all__ = ["PRESETS", "preset", "SD3Config", "FluxConfig", "Flux2Config", "QwenImageConfig", "QwenImage21Config",
           "ChromaConfig"]
