"""Chroma checkpoints (Chroma1-HD, Chroma1-Base, chroma-unlocked-v*): the official names (ours) and diffusers'
(``ChromaTransformer2DModel``, as diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers`` reads
the original).

The blocks are FLUX.1's without their modulation Linears, so the table is FLUX.1's minus the rows of
the removed layers, plus the approximator's. See ``weights/families/__init__.py`` for what a family
module holds.
"""
from __future__ import annotations

from collections.abc import Mapping

from ...models.chroma import ChromaConfig
from ..checkpoint import CheckpointError, count_indexed, need_key
from . import flux

FAMILY = "chroma"
NAME = "Chroma"
CONFIG = ChromaConfig
# The same name in both layouts; a Chroma file also has FLUX.1's markers, but detection counts the
# keys each family knows under the prefix, and only Chroma's table knows the approximator's.
MARKERS = {"original": "distilled_guidance_layer.in_proj.weight",
           "diffusers": "distilled_guidance_layer.in_proj.weight"}
DIFFUSERS_CLASSES = ("ChromaTransformer2DModel",)
# FLUX.1 layers that Chroma does not have: its approximator gives every adaLN vector
_REMOVED = ("time_in.", "vector_in.", "guidance_in.", "double_blocks.{}.img_mod.", "double_blocks.{}.txt_mod.",
            "single_blocks.{}.modulation.", "final_layer.adaLN_modulation.")

TABLE = [row for row in flux.TABLE if not row[0].startswith(_REMOVED)] + [
    ("distilled_guidance_layer.in_proj.*", "distilled_guidance_layer.in_proj.*", "copy"),
    ("distilled_guidance_layer.layers.{}.in_layer.*", "distilled_guidance_layer.layers.{}.linear_1.*", "copy"),
    ("distilled_guidance_layer.layers.{}.out_layer.*", "distilled_guidance_layer.layers.{}.linear_2.*", "copy"),
    ("distilled_guidance_layer.norms.{}.scale", "distilled_guidance_layer.norms.{}.weight", "copy"),
    ("distilled_guidance_layer.out_proj.*", "distilled_guidance_layer.out_proj.*", "copy"),
]


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (original) names."""
    need = lambda k: need_key(s, k, where, "Chroma")  # noqa: E731
    H, c_in = need("img_in.weight")
    norm = next((k for k in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.norm.key_norm.scale")
                 if k in s), "double_blocks.0.img_attn.norm.key_norm.scale")
    head_dim = need(norm)[0]
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}")
    approx_hidden, approx_in = need("distilled_guidance_layer.in_proj.weight")
    fields = dict(num_double=count_indexed(s, "double_blocks.{}."), num_single=count_indexed(s, "single_blocks.{}."),
                  num_heads=H // head_dim, head_dim=head_dim, in_channels=c_in,
                  out_channels=need("final_layer.linear.weight")[0], context_dim=need("txt_in.weight")[1],
                  approximator_in=approx_in, approximator_hidden=approx_hidden,
                  approximator_layers=count_indexed(s, "distilled_guidance_layer.layers.{}."))
    if "double_blocks.0.img_mlp.0.weight" in s:
        fields["mlp_ratio"] = s["double_blocks.0.img_mlp.0.weight"][0] / H
    elif "single_blocks.0.linear1.weight" in s:
        fields["mlp_ratio"] = (s["single_blocks.0.linear1.weight"][0] - 3 * H) / H
    if head_dim in flux.AXES:
        fields["axes_dim"] = flux.AXES[head_dim]
    return fields


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers ``ChromaTransformer2DModel`` config.json (None where it is silent)."""
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
    if get("patch_size", 1) != 1:
        raise CheckpointError(f"{where}: config.json patch_size={cj['patch_size']}; Chroma uses 1")
    return dict(num_double=get("num_layers"), num_single=get("num_single_layers"),
                num_heads=get("num_attention_heads"), head_dim=get("attention_head_dim"),
                in_channels=get("in_channels"), out_channels=get("out_channels"),
                context_dim=get("joint_attention_dim"),
                axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None,
                approximator_in=get("approximator_num_channels"), approximator_hidden=get("approximator_hidden_dim"),
                approximator_layers=get("approximator_layers"))


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is the released 128."""
    return flux.finish_fields(fields, where)
