"""FLUX.1 checkpoints (dev, schnell, Fill, Depth, Canny, Kontext): BFL's names (ours) and diffusers'.

See ``weights/families/__init__.py`` for what a family module holds.
"""
from __future__ import annotations

from collections.abc import Mapping

from ...models.flux import FluxConfig
from ..checkpoint import CheckpointError, count_indexed, need_key

FAMILY = "flux"
NAME = "FLUX.1"
CONFIG = FluxConfig
MARKERS = {"original": "img_in.weight", "diffusers": "x_embedder.weight"}
DIFFUSERS_CLASSES = ("FluxTransformer2DModel",)
AXES = {128: (16, 56, 56)}  # the RoPE split of head_dim used by every released FLUX.1

# the double blocks' attention, the same in FLUX.2
DOUBLE_ATTENTION = [
    ("double_blocks.{}.img_attn.qkv.*", ("transformer_blocks.{}.attn.to_q.*",
                                         "transformer_blocks.{}.attn.to_k.*",
                                         "transformer_blocks.{}.attn.to_v.*"), "qkv"),
    ("double_blocks.{}.txt_attn.qkv.*", ("transformer_blocks.{}.attn.add_q_proj.*",
                                         "transformer_blocks.{}.attn.add_k_proj.*",
                                         "transformer_blocks.{}.attn.add_v_proj.*"), "qkv"),
    ("double_blocks.{}.img_attn.norm.query_norm.scale", "transformer_blocks.{}.attn.norm_q.weight", "copy"),
    ("double_blocks.{}.img_attn.norm.key_norm.scale", "transformer_blocks.{}.attn.norm_k.weight", "copy"),
    ("double_blocks.{}.txt_attn.norm.query_norm.scale", "transformer_blocks.{}.attn.norm_added_q.weight", "copy"),
    ("double_blocks.{}.txt_attn.norm.key_norm.scale", "transformer_blocks.{}.attn.norm_added_k.weight", "copy"),
    ("double_blocks.{}.img_attn.proj.*", "transformer_blocks.{}.attn.to_out.0.*", "copy"),
    ("double_blocks.{}.txt_attn.proj.*", "transformer_blocks.{}.attn.to_add_out.*", "copy"),
]

TABLE = [
    ("img_in.*", "x_embedder.*", "copy"),
    ("txt_in.*", "context_embedder.*", "copy"),
    ("time_in.in_layer.*", "time_text_embed.timestep_embedder.linear_1.*", "copy"),
    ("time_in.out_layer.*", "time_text_embed.timestep_embedder.linear_2.*", "copy"),
    ("vector_in.in_layer.*", "time_text_embed.text_embedder.linear_1.*", "copy"),
    ("vector_in.out_layer.*", "time_text_embed.text_embedder.linear_2.*", "copy"),
    ("guidance_in.in_layer.*", "time_text_embed.guidance_embedder.linear_1.*", "copy"),
    ("guidance_in.out_layer.*", "time_text_embed.guidance_embedder.linear_2.*", "copy"),
    ("double_blocks.{}.img_mod.lin.*", "transformer_blocks.{}.norm1.linear.*", "copy"),
    ("double_blocks.{}.txt_mod.lin.*", "transformer_blocks.{}.norm1_context.linear.*", "copy"),
    *DOUBLE_ATTENTION,
    ("double_blocks.{}.img_mlp.0.*", "transformer_blocks.{}.ff.net.0.proj.*", "copy"),
    ("double_blocks.{}.img_mlp.2.*", "transformer_blocks.{}.ff.net.2.*", "copy"),
    ("double_blocks.{}.txt_mlp.0.*", "transformer_blocks.{}.ff_context.net.0.proj.*", "copy"),
    ("double_blocks.{}.txt_mlp.2.*", "transformer_blocks.{}.ff_context.net.2.*", "copy"),
    ("single_blocks.{}.modulation.lin.*", "single_transformer_blocks.{}.norm.linear.*", "copy"),
    ("single_blocks.{}.linear1.*", ("single_transformer_blocks.{}.attn.to_q.*",
                                    "single_transformer_blocks.{}.attn.to_k.*",
                                    "single_transformer_blocks.{}.attn.to_v.*",
                                    "single_transformer_blocks.{}.proj_mlp.*"), "qkv_mlp"),
    ("single_blocks.{}.norm.query_norm.scale", "single_transformer_blocks.{}.attn.norm_q.weight", "copy"),
    ("single_blocks.{}.norm.key_norm.scale", "single_transformer_blocks.{}.attn.norm_k.weight", "copy"),
    ("single_blocks.{}.linear2.*", "single_transformer_blocks.{}.proj_out.*", "copy"),
    ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "adaln"),
    ("final_layer.linear.*", "proj_out.*", "copy"),
]


def block_fields(s: Mapping, where: str, name: str) -> dict:
    """The fields the FLUX.1 blocks tell, from the shapes of our (original) names (Chroma's too)."""
    need = lambda k: need_key(s, k, where, name)  # noqa: E731
    H, c_in = need("img_in.weight")
    norm = next((k for k in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.norm.key_norm.scale")
                 if k in s), "double_blocks.0.img_attn.norm.key_norm.scale")
    head_dim = need(norm)[0]
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}")
    fields = dict(num_double=count_indexed(s, "double_blocks.{}."), num_single=count_indexed(s, "single_blocks.{}."),
                  num_heads=H // head_dim, head_dim=head_dim, in_channels=c_in,
                  out_channels=need("final_layer.linear.weight")[0],  # < in_channels: Fill, Depth, Canny
                  context_dim=need("txt_in.weight")[1])
    if "double_blocks.0.img_mlp.0.weight" in s:
        fields["mlp_ratio"] = s["double_blocks.0.img_mlp.0.weight"][0] / H
    elif "single_blocks.0.linear1.weight" in s:
        fields["mlp_ratio"] = (s["single_blocks.0.linear1.weight"][0] - 3 * H) / H
    if head_dim in AXES:
        fields["axes_dim"] = AXES[head_dim]
    return fields


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (original) names."""
    return {**block_fields(s, where, "FLUX"), "pooled_dim": need_key(s, "vector_in.in_layer.weight", where, "FLUX")[1],
            "guidance_embed": "guidance_in.in_layer.weight" in s}


def block_json(cj: dict, where: str, name: str) -> dict:
    """The block fields of a diffusers FLUX.1 / Chroma config.json (None where it is silent)."""
    get = lambda key: cj.get(key)  # noqa: E731
    if cj.get("patch_size") not in (None, 1):
        raise CheckpointError(f"{where}: config.json patch_size={cj['patch_size']}; {name} uses 1")
    return dict(num_double=get("num_layers"), num_single=get("num_single_layers"),
                num_heads=get("num_attention_heads"), head_dim=get("attention_head_dim"),
                in_channels=get("in_channels"), out_channels=get("out_channels"),
                context_dim=get("joint_attention_dim"),
                axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None)


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers transformer config.json (None where it is silent)."""
    return {**block_json(cj, where, "FLUX.1"), "pooled_dim": cj.get("pooled_projection_dim"),
            "guidance_embed": cj.get("guidance_embeds")}


def example_axes(head_dim: int) -> tuple[int, int, int]:
    """A RoPE split of ``head_dim`` in FLUX.1's proportions (16, 56, 56) / 128, every part even."""
    t = max(2, 2 * round(head_dim / 16))
    hw = (head_dim - t) // 2
    if hw % 2:
        t, hw = t + 2, hw - 1
    return t, hw, hw


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is FLUX.1's 128."""
    if "axes_dim" not in fields:
        d = fields.get("head_dim")
        example = example_axes(d) if isinstance(d, int) and d > 0 else (8, 28, 28)
        axes = ",".join(map(str, example))
        raise CheckpointError(
            f"{where}: FLUX head_dim is {d}, and the RoPE split of the head dim (axes_dim) can't be read from the "
            f"weights (it is (16, 56, 56) only for head_dim 128). Pass it, e.g. load_transformer(..., "
            f"config={{'axes_dim': {example}}}) or mmdit inspect --config axes_dim={axes}, or add a config.json")
    return fields
