"""Layout, family and architecture of a checkpoint, from its keys and shapes alone.

Nothing is read but names and shapes: pass a ``Checkpoint``, a state dict, or a plain
``{name: shape}`` mapping. A diffusers ``config.json`` (when there is one) takes
precedence over what the shapes say; the strict load that follows checks both agree.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..models.config import PRESETS, FluxConfig, SD3Config
from . import keymaps
from .checkpoint import Checkpoint, CheckpointError, count_indexed

# Other components that all-in-one files carry beside the transformer; never loaded here.
OTHER_COMPONENTS = ("text_encoders.", "first_stage_model.", "vae.", "conditioner.", "cond_stage_model.")

# (layout, family, a key only that layout of that family has). The checkpoint's prefix is
# whatever stands before the marker; when several prefixes hold one, the one under which
# most keys are known names of that layout wins.
MARKERS = [
    ("original", "sd3", "joint_blocks.0.x_block.attn.qkv.weight"),
    ("original", "flux", "img_in.weight"),
    ("diffusers", "sd3", "pos_embed.proj.weight"),
    ("diffusers", "flux", "x_embedder.weight"),
]

DIFFUSERS_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FLUX_AXES = {128: (16, 56, 56)}  # the RoPE split of head_dim used by every released FLUX.1


@dataclass(frozen=True)
class Detected:
    """What a checkpoint holds. ``keys`` are its transformer tensors (prefix included)."""

    layout: str  # "original" (Stability / BFL names) | "diffusers"
    prefix: str  # e.g. "model.diffusion_model." or ""
    family: str  # "sd3" | "flux"
    config: SD3Config | FluxConfig
    preset: str | None  # the PRESETS name the config equals, if any
    config_source: str  # "shapes" | "config.json" | "given"
    keys: tuple[str, ...]
    ignored: dict[str, int]  # other components in the file: prefix -> tensor count


def shapes_of(tensors) -> dict[str, tuple[int, ...]]:
    """name -> shape for a Checkpoint, a state dict, or a mapping of shapes."""
    if isinstance(tensors, Checkpoint) or callable(getattr(tensors, "shape", None)):  # or a formats.Canonical
        return {k: tensors.shape(k) for k in tensors}
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in tensors.items()}


def detect(tensors, config_json: dict | None = None, config: SD3Config | FluxConfig | dict | None = None,
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

    if isinstance(config, (SD3Config, FluxConfig)):
        if config.family != family:
            raise CheckpointError(f"{where} holds a {family} transformer, but the config given is {config.family}")
        cfg, source = config, "given"
    else:
        try:
            fields = (_sd3_fields if family == "sd3" else _flux_fields)(sub, where)
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
    if not found:
        raise CheckpointError(f"{where} is not an SD3 / SD3.5 / FLUX.1 transformer checkpoint: "
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


def _need(shapes: Mapping, key: str, where: str, family: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{where} looks like a {family} transformer but has no {key!r} "
                              "(or its diffusers equivalent): it is one shard of a multi-file checkpoint (point at "
                              "the folder or its index.json), or a variant of the architecture this loader does not "
                              "know")
    return shapes[key]


def _sd3_fields(s: Mapping, where: str) -> dict:
    need = lambda k: _need(s, k, where, "SD3")  # noqa: E731
    H, c_in, p, _ = need("x_embedder.proj.weight")  # (H, 16, 2, 2)
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in s
    head_dim = s["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk else 64  # SAI rule: heads = H / 64
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}; "
                              "pass config=SD3Config(...) with the right num_heads/head_dim")
    n_pos = need("pos_embed")[1]
    M = math.isqrt(n_pos)
    if M * M != n_pos:
        raise CheckpointError(f"{where}: pos_embed has {n_pos} rows, not a square M*M table")
    return dict(num_layers=count_indexed(s, "joint_blocks.{}."), num_heads=H // head_dim, head_dim=head_dim,
                patch_size=p, in_channels=c_in, out_channels=need("final_layer.linear.weight")[0] // (p * p),
                pos_embed_max_size=M, context_dim=need("context_embedder.weight")[1],
                pooled_dim=need("y_embedder.mlp.0.weight")[1], qk_norm=qk,
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in s if ".x_block.attn2.qkv." in k})),
                mlp_ratio=need("joint_blocks.0.x_block.mlp.fc1.weight")[0] / H)


def _flux_fields(s: Mapping, where: str) -> dict:
    need = lambda k: _need(s, k, where, "FLUX")  # noqa: E731
    H, c_in = need("img_in.weight")
    norm = next((k for k in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.norm.key_norm.scale")
                 if k in s), "double_blocks.0.img_attn.norm.key_norm.scale")
    head_dim = need(norm)[0]
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}")
    fields = dict(num_double=count_indexed(s, "double_blocks.{}."), num_single=count_indexed(s, "single_blocks.{}."),
                  num_heads=H // head_dim, head_dim=head_dim, in_channels=c_in,
                  out_channels=need("final_layer.linear.weight")[0],  # < in_channels: Fill, Depth, Canny
                  context_dim=need("txt_in.weight")[1], pooled_dim=need("vector_in.in_layer.weight")[1],
                  guidance_embed="guidance_in.in_layer.weight" in s)
    if "double_blocks.0.img_mlp.0.weight" in s:
        fields["mlp_ratio"] = s["double_blocks.0.img_mlp.0.weight"][0] / H
    elif "single_blocks.0.linear1.weight" in s:
        fields["mlp_ratio"] = (s["single_blocks.0.linear1.weight"][0] - 3 * H) / H
    if head_dim in FLUX_AXES:
        fields["axes_dim"] = FLUX_AXES[head_dim]
    return fields


def _fields_from_json(cj: dict, family: str, where: str) -> dict:
    cls = cj.get("_class_name")
    if cls is not None and DIFFUSERS_CLASSES.get(cls) != family:
        raise CheckpointError(f"{where}: config.json names {cls}, but the weights are a {family} transformer")
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
    if family == "sd3":
        qk = get("qk_norm")
        if qk not in (None, "rms_norm"):
            raise CheckpointError(f"{where}: config.json qk_norm={qk!r} is not supported (only 'rms_norm' or null)")
        f = dict(num_layers=get("num_layers"), num_heads=get("num_attention_heads"),
                 head_dim=get("attention_head_dim"), patch_size=get("patch_size"),
                 in_channels=get("in_channels"), out_channels=get("out_channels"),
                 pos_embed_max_size=get("pos_embed_max_size"), context_dim=get("joint_attention_dim"),
                 pooled_dim=get("pooled_projection_dim"), qk_norm=qk == "rms_norm" if "qk_norm" in cj else None,
                 dual_attention_layers=tuple(cj["dual_attention_layers"]) if "dual_attention_layers" in cj else None)
        cap = get("caption_projection_dim")
        if cap is not None and f["num_heads"] and f["head_dim"] and cap != f["num_heads"] * f["head_dim"]:
            raise CheckpointError(f"{where}: config.json caption_projection_dim={cap} differs from "
                                  f"heads*head_dim={f['num_heads'] * f['head_dim']}; not supported")
    else:
        if get("patch_size", 1) != 1:
            raise CheckpointError(f"{where}: config.json patch_size={cj['patch_size']}; FLUX.1 uses 1")
        f = dict(num_double=get("num_layers"), num_single=get("num_single_layers"),
                 num_heads=get("num_attention_heads"), head_dim=get("attention_head_dim"),
                 in_channels=get("in_channels"), out_channels=get("out_channels"),
                 context_dim=get("joint_attention_dim"),
                 pooled_dim=get("pooled_projection_dim"), guidance_embed=get("guidance_embeds"),
                 axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None)
    return {k: v for k, v in f.items() if v is not None}


def _make_config(family: str, fields: dict, where: str) -> SD3Config | FluxConfig:
    cls = SD3Config if family == "sd3" else FluxConfig
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    if family == "flux" and "axes_dim" not in fields:
        raise CheckpointError(
            f"{where}: FLUX head_dim is {fields.get('head_dim')}, and the RoPE split of the head dim "
            "(axes_dim) can't be read from the weights (it is (16, 56, 56) only for head_dim 128). "
            "Pass it, e.g. load_transformer(..., config={'axes_dim': (8, 28, 28)}), or add a config.json")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inferred config is invalid: {e}") from None
