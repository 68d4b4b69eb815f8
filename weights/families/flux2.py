"""FLUX.2 checkpoints ([dev], [klein] 4B / 9B): BFL's names (ours) and diffusers'.

A FLUX.2 file has FLUX.1's block names but shared modulations (``double_stream_modulation_img``,
...) instead of per-block ones, and no biases. See ``weights/families/__init__.py`` for what a
family module holds.
"""
from __future__ import annotations

from collections.abc import Mapping

from ...models.flux2 import Flux2Config
from ..checkpoint import CheckpointError, count_indexed, need_key
from . import flux

FAMILY = "flux2"
NAME = "FLUX.2"
CONFIG = Flux2Config
MARKERS = {"original": "double_stream_modulation_img.lin.weight",
           "diffusers": "double_stream_modulation_img.linear.weight"}
DIFFUSERS_CLASSES = ("Flux2Transformer2DModel",)
AXES = {128: (32, 32, 32, 32)}  # the RoPE split of head_dim of every released FLUX.2

TABLE = [
    ("img_in.*", "x_embedder.*", "copy"),
    ("txt_in.*", "context_embedder.*", "copy"),
    ("time_in.in_layer.*", "time_guidance_embed.timestep_embedder.linear_1.*", "copy"),
    ("time_in.out_layer.*", "time_guidance_embed.timestep_embedder.linear_2.*", "copy"),
    ("guidance_in.in_layer.*", "time_guidance_embed.guidance_embedder.linear_1.*", "copy"),
    ("guidance_in.out_layer.*", "time_guidance_embed.guidance_embedder.linear_2.*", "copy"),
    ("double_stream_modulation_img.lin.*", "double_stream_modulation_img.linear.*", "copy"),
    ("double_stream_modulation_txt.lin.*", "double_stream_modulation_txt.linear.*", "copy"),
    ("single_stream_modulation.lin.*", "single_stream_modulation.linear.*", "copy"),
    *flux.DOUBLE_ATTENTION,
    ("double_blocks.{}.img_mlp.0.*", "transformer_blocks.{}.ff.linear_in.*", "copy"),
    ("double_blocks.{}.img_mlp.2.*", "transformer_blocks.{}.ff.linear_out.*", "copy"),
    ("double_blocks.{}.txt_mlp.0.*", "transformer_blocks.{}.ff_context.linear_in.*", "copy"),
    ("double_blocks.{}.txt_mlp.2.*", "transformer_blocks.{}.ff_context.linear_out.*", "copy"),
    ("single_blocks.{}.linear1.*", "single_transformer_blocks.{}.attn.to_qkv_mlp_proj.*", "copy"),
    ("single_blocks.{}.linear2.*", "single_transformer_blocks.{}.attn.to_out.*", "copy"),
    ("single_blocks.{}.norm.query_norm.scale", "single_transformer_blocks.{}.attn.norm_q.weight", "copy"),
    ("single_blocks.{}.norm.key_norm.scale", "single_transformer_blocks.{}.attn.norm_k.weight", "copy"),
    ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "adaln"),
    ("final_layer.linear.*", "proj_out.*", "copy"),
]


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (original) names: widths from the input projections,
    head_dim from a qk-norm scale, depths from the block count, guidance from ``guidance_in``."""
    need = lambda k: need_key(s, k, where, "FLUX.2")  # noqa: E731
    H, c_in = need("img_in.weight")
    norm = next((k for k in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.norm.key_norm.scale")
                 if k in s), "double_blocks.0.img_attn.norm.key_norm.scale")
    head_dim = need(norm)[0]
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}")
    fields = dict(num_double=count_indexed(s, "double_blocks.{}."), num_single=count_indexed(s, "single_blocks.{}."),
                  num_heads=H // head_dim, head_dim=head_dim, in_channels=c_in, context_dim=need("txt_in.weight")[1],
                  guidance_embed="guidance_in.in_layer.weight" in s)
    if "double_blocks.0.img_mlp.2.weight" in s:  # (D, M)
        fields["mlp_ratio"] = s["double_blocks.0.img_mlp.2.weight"][1] / H
    elif "single_blocks.0.linear2.weight" in s:  # (D, D + M)
        fields["mlp_ratio"] = (s["single_blocks.0.linear2.weight"][1] - H) / H
    if head_dim in AXES:
        fields["axes_dim"] = AXES[head_dim]
    return fields


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers ``Flux2Transformer2DModel`` config.json (None where it is silent)."""
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
    if get("patch_size", 1) != 1 or get("timestep_guidance_channels", 256) != 256:
        raise CheckpointError(f"{where}: config.json patch_size={cj.get('patch_size')}, timestep_guidance_channels="
                              f"{cj.get('timestep_guidance_channels')}; FLUX.2 uses 1 and 256")
    if get("out_channels") not in (None, get("in_channels", 128)):
        raise CheckpointError(f"{where}: config.json out_channels={cj['out_channels']} differs from in_channels; "
                              "FLUX.2 returns what it takes")
    return dict(num_double=get("num_layers"), num_single=get("num_single_layers"),
                num_heads=get("num_attention_heads"), head_dim=get("attention_head_dim"),
                in_channels=get("in_channels"), context_dim=get("joint_attention_dim"),
                guidance_embed=get("guidance_embeds"), mlp_ratio=get("mlp_ratio"), theta=get("rope_theta"),
                axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None)


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is FLUX.2's 128."""
    if "axes_dim" not in fields:
        d = fields.get("head_dim")
        part = (d // 4) & ~1 if isinstance(d, int) and d >= 8 else 4  # four even parts, the first takes the rest
        example = (d - 3 * part, part, part, part) if isinstance(d, int) and d >= 8 else (4, 4, 4, 4)
        raise CheckpointError(
            f"{where}: FLUX.2 head_dim is {d}, and the RoPE split of the head dim (axes_dim) can't be read from the "
            f"weights (it is (32, 32, 32, 32) only for head_dim 128). Pass it, e.g. load_transformer(..., "
            f"config={{'axes_dim': {example}}}) or mmdit inspect --config axes_dim={','.join(map(str, example))}, "
            "or add a config.json")
    return fields
