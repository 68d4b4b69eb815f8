"""Layout, family and architecture of a checkpoint, from its keys and shapes alone.

Nothing is read but names and shapes: pass a ``Checkpoint``, a state dict, or a plain
``{name: shape}`` mapping. A diffusers ``config.json`` (when there is one) takes
precedence over what the shapes say; the strict load that follows checks both agree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..models.config import PRESETS
from . import keymaps
from .checkpoint import Checkpoint, CheckpointError, shard_set
from .families import FAMILIES

# Other components that all-in-one files carry beside the transformer; never loaded here.
OTHER_COMPONENTS = ("text_encoders.", "first_stage_model.", "vae.", "conditioner.", "cond_stage_model.")

# (layout, family, a key only that layout of that family has). The checkpoint's prefix is
# whatever stands before the marker; when several prefixes (or families) match, the one under
# which most keys are known names of that layout and family wins.
MARKERS = [(layout, name, key) for name, family in FAMILIES.items() for layout, key in family.MARKERS.items()]
DIFFUSERS_CLASSES = {cls: name for name, family in FAMILIES.items() for cls in family.DIFFUSERS_CLASSES}


@dataclass(frozen=True)
class Detected:
    """What a checkpoint holds. ``keys`` are its transformer tensors (prefix included)."""

    layout: str  # "original" (Stability / BFL names) | "diffusers"
    prefix: str  # e.g. "model.diffusion_model." or ""
    family: str  # a key of weights.families.FAMILIES: "sd3", "flux", ...
    config: object  # the family's config dataclass
    preset: str | None  # the PRESETS name the config equals, if any
    config_source: str  # "shapes" | "config.json" | "given"
    keys: tuple[str, ...]
    ignored: dict[str, int]  # other components in the file: prefix -> tensor count


def shapes_of(tensors) -> dict[str, tuple[int, ...]]:
    """name -> shape for a Checkpoint, a state dict, or a mapping of shapes."""
    if isinstance(tensors, Checkpoint) or callable(getattr(tensors, "shape", None)):  # or a formats.Canonical
        return {k: tensors.shape(k) for k in tensors}
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in tensors.items()}


def detect(tensors, config_json: dict | None = None, config=None,
           where: str = "checkpoint") -> Detected:
    """Layout, prefix, family and config of ``tensors`` (see ``shapes_of``).

    ``config_json``: a diffusers transformer ``config.json`` (read instead of the shapes).
    ``config``: a full config (used as is) or a dict of field overrides.
    """
    shapes = shapes_of(tensors)
    ignored: dict[str, int] = {}
    for k in shapes:
        other = next((p for p in OTHER_COMPONENTS if k.startswith(p)), None)
        if other:
            part = (other + k[len(other):].split(".")[0]) if other == "text_encoders." else other.rstrip(".")
            ignored[part] = ignored.get(part, 0) + 1
    own = {k: s for k, s in shapes.items() if not k.startswith(OTHER_COMPONENTS)}
    layout, family, prefix = _find_layout(own, where)
    keys = tuple(own)
    sub = {k[len(prefix):]: s for k, s in own.items() if k.startswith(prefix)}
    if layout == "diffusers":  # read the diffusers shapes through the key map: one detector below
        recipes, _, _ = keymaps.plan_from_diffusers(sub, family)
        sub = {k: keymaps.combined_shape(r.op, [sub[s] for s in r.keys]) for k, r in recipes.items()}

    if config is not None and not isinstance(config, dict):
        if config.family != family:
            raise CheckpointError(f"{where} holds a {family} transformer, but the config given is {config.family}")
        cfg, source = config, "given"
    else:
        try:
            fields = FAMILIES[family].fields_from_shapes(sub, where)
        except CheckpointError:
            if config_json is None:
                raise
            fields = {}  # config.json says it all; the strict load checks the shapes
        source = "shapes"
        if config_json is not None:
            fields.update(_fields_from_json(config_json, family, where))
            source = "config.json"
        fields.update(config or {})
        cfg = _make_config(family, fields, where)
    match = next((name for name, p in PRESETS.items() if p == cfg), None)
    return Detected(layout, prefix, family, cfg, match, source, keys, ignored)


def _find_layout(shapes: Mapping, where: str) -> tuple[str, str, str]:
    found = {}
    for layout, family, marker in MARKERS:
        for k in shapes:
            if k.endswith(marker) and (len(k) == len(marker) or k[-len(marker) - 1] == "."):
                prefix = k[:-len(marker)]
                found[(layout, family, prefix)] = sum(1 for q in shapes if q.startswith(prefix)
                                                      and keymaps.known(q[len(prefix):], layout, family))
    if not found and shard_set([Path(where)]) is not None:
        raise CheckpointError(f"{where} is one shard of a multi-file set: point at the folder or its index.json "
                              "(this shard alone does not hold the keys that say which model it is)")
    if not found:
        names = " / ".join(f.NAME.split(" (")[0] for f in FAMILIES.values())
        raise CheckpointError(f"{where} is not an {names} transformer checkpoint: "
                              f"{_what_is_it(shapes)}. Point at the transformer file, or at the "
                              "diffusers folder (or its transformer/ subfolder).")
    # most keys under the prefix wins; ties go to the longer (more specific) prefix
    return max(found, key=lambda t: (found[t], len(t[2])))


def _what_is_it(shapes: Mapping) -> str:
    keys = list(shapes)
    if not keys:
        return "it holds no transformer tensors (only other components, or nothing)"
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if has("decoder.conv_in.") or has("encoder.conv_in."):
        kind = "it looks like a VAE (autoencoder)"
    elif has("text_model.") or has("encoder.layers."):
        kind = "it looks like a CLIP text encoder"
    elif has("encoder.block.") or has("shared.weight"):
        kind = "it looks like a T5 text encoder"
    elif has("down_blocks.") or has("input_blocks."):
        kind = "it looks like a UNet (SD 1.x / SDXL), which this project does not implement"
    else:
        kind = "no known transformer keys"
    return f"{kind}; first keys: {keys[:3]}"


def _fields_from_json(cj: dict, family: str, where: str) -> dict:
    cls = cj.get("_class_name")
    if cls is not None and DIFFUSERS_CLASSES.get(cls) != family:
        raise CheckpointError(f"{where}: config.json names {cls}, but the weights are a {family} transformer")
    return {k: v for k, v in FAMILIES[family].fields_from_json(cj, where).items() if v is not None}


def _make_config(family: str, fields: dict, where: str):
    cls = FAMILIES[family].CONFIG
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    finish = getattr(FAMILIES[family], "finish_fields", None)
    if finish is not None:
        fields = finish(fields, where)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inferred config is invalid: {e}") from None
