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
from ..checkpoint import count_indexed, need_key
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
    """Config fields from the shapes of our (original) names: FLUX.1's blocks and the approximator."""
    approx_hidden, approx_in = need_key(s, "distilled_guidance_layer.in_proj.weight", where, "Chroma")
    return {**flux.block_fields(s, where, "Chroma"), "approximator_in": approx_in,
            "approximator_hidden": approx_hidden,
            "approximator_layers": count_indexed(s, "distilled_guidance_layer.layers.{}.")}


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers ``ChromaTransformer2DModel`` config.json (None where it is silent)."""
    return {**flux.block_json(cj, where, "Chroma"), "approximator_in": cj.get("approximator_num_channels"),
            "approximator_hidden": cj.get("approximator_hidden_dim"), "approximator_layers": cj.get("approximator_layers")}


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is the released 128."""
    return flux.finish_fields(fields, where)
