"""Qwen-Image 2.1 checkpoints: the original names (ours) and diffusers', and the config.

See ``weights/families/__init__.py`` for what a family module holds. The original file (and
ComfyUI's, prefixed ``model.diffusion_model.``) holds each block's SwiGLU gate and up projections
as one ``img_mlp.gate_up`` (gate rows first); diffusers splits it into ``gate_layer`` and ``proj``
(``convert_qwen_image21_transformer_checkpoint_to_diffusers``). Every other name is the same in both,
the text norm's zero-centred weight (scale - 1) included.
"""
from __future__ import annotations

from collections.abc import Mapping

from ...models.qwen_image21 import QwenImage21Config
from ..checkpoint import CheckpointError, count_indexed, need_key

FAMILY = "qwen-image-2.1"
NAME = "Qwen-Image 2.1"
CONFIG = QwenImage21Config
MARKERS = {"original": "transformer_blocks.0.img_mlp.gate_up.weight",
           "diffusers": "transformer_blocks.0.img_mlp.gate_layer.weight"}
DIFFUSERS_CLASSES = ("QwenImage21Transformer2DModel",)
AXES = {128: (16, 56, 56)}

_SAME = [
    "time_text_embed.timestep_embedder.linear_1.*", "time_text_embed.timestep_embedder.linear_2.*",
    "txt_in.text_norm.weight", "txt_in.in_layer.*", "txt_in.out_layer.*", "img_in.*", "modulation.1.*",
    *(f"transformer_blocks.{{}}.{m}" for m in ("attn.to_q.*", "attn.to_k.*", "attn.to_v.*", "attn.to_out.0.*",
                                              "attn.norm_q.weight", "attn.norm_k.weight", "img_mlp.out.*")),
    "norm_out.linear.*", "proj_out.*",
]
TABLE = [(name, name, "copy") for name in _SAME] + [
    ("transformer_blocks.{}.img_mlp.gate_up.*", ("transformer_blocks.{}.img_mlp.gate_layer.*",
                                                 "transformer_blocks.{}.img_mlp.proj.*"), "gate_up"),
]


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (original) names."""
    need = lambda k: need_key(s, k, where, "Qwen-Image 2.1")  # noqa: E731
    H, c_in = need("img_in.weight")
    head_dim = need("transformer_blocks.0.attn.norm_q.weight")[0]
    hidden2 = need("transformer_blocks.0.img_mlp.gate_up.weight")[0]
    if H % head_dim or hidden2 % (2 * H):
        raise CheckpointError(f"{where}: hidden size {H}, head_dim {head_dim} and SwiGLU rows {hidden2} do not "
                              "fit Qwen-Image 2.1 (hidden a multiple of head_dim, gate_up 2 x mlp_ratio x hidden)")
    fields = dict(num_layers=count_indexed(s, "transformer_blocks.{}."), num_heads=H // head_dim,
                  head_dim=head_dim, in_channels=c_in, out_channels=need("proj_out.weight")[0],
                  context_dim=need("txt_in.in_layer.weight")[1], mlp_ratio=hidden2 // (2 * H))
    if head_dim in AXES:
        fields["axes_dim"] = AXES[head_dim]
    return fields


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers ``QwenImage21Transformer2DModel`` config.json (None where silent)."""
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
    if get("patch_size", 1) != 1:
        raise CheckpointError(f"{where}: config.json patch_size={cj['patch_size']}; Qwen-Image 2.1 uses 1")
    return dict(num_layers=get("num_layers"), num_heads=get("num_attention_heads"),
                head_dim=get("attention_head_dim"), in_channels=get("in_channels"),
                out_channels=get("out_channels", get("in_channels")), context_dim=get("context_in_dim"),
                mlp_ratio=get("mlp_ratio"), eps=get("eps"), causal_condition=get("causal_condition"),
                axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None)


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is the released 128."""
    if "axes_dim" not in fields:
        raise CheckpointError(
            f"{where}: Qwen-Image 2.1 head_dim is {fields.get('head_dim')}, and the RoPE split of the head dim "
            "(axes_dim) can't be read from the weights (it is (16, 56, 56) only for head_dim 128). "
            "Pass it, e.g. load_transformer(..., config={'axes_dim': (4, 6, 6)}), or add a config.json")
    return fields
