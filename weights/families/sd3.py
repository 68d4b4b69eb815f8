"""SD3 / SD3.5 checkpoints: Stability's original names (ours) and diffusers', and the config from shapes.

See ``weights/families/__init__.py`` for what a family module holds. The key table's rows are
``(ours, diffusers, op)``; ``weights.keymaps`` explains the ops.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from ...models.sd3 import SD3Config
from ..checkpoint import CheckpointError, count_indexed, need_key

FAMILY = "sd3"
NAME = "SD3 / SD3.5 (MMDiT)"
CONFIG = SD3Config
MARKERS = {"original": "joint_blocks.0.x_block.attn.qkv.weight", "diffusers": "pos_embed.proj.weight"}
DIFFUSERS_CLASSES = ("SD3Transformer2DModel",)

TABLE = [
    ("pos_embed", "pos_embed.pos_embed", "copy"),
    ("x_embedder.proj.*", "pos_embed.proj.*", "copy"),
    ("t_embedder.mlp.0.*", "time_text_embed.timestep_embedder.linear_1.*", "copy"),
    ("t_embedder.mlp.2.*", "time_text_embed.timestep_embedder.linear_2.*", "copy"),
    ("y_embedder.mlp.0.*", "time_text_embed.text_embedder.linear_1.*", "copy"),
    ("y_embedder.mlp.2.*", "time_text_embed.text_embedder.linear_2.*", "copy"),
    ("context_embedder.*", "context_embedder.*", "copy"),
    ("joint_blocks.{}.x_block.adaLN_modulation.1.*", "transformer_blocks.{}.norm1.linear.*", "copy"),
    ("joint_blocks.{}.x_block.attn.qkv.*", ("transformer_blocks.{}.attn.to_q.*",
                                            "transformer_blocks.{}.attn.to_k.*",
                                            "transformer_blocks.{}.attn.to_v.*"), "qkv"),
    ("joint_blocks.{}.x_block.attn.ln_q.*", "transformer_blocks.{}.attn.norm_q.*", "copy"),
    ("joint_blocks.{}.x_block.attn.ln_k.*", "transformer_blocks.{}.attn.norm_k.*", "copy"),
    ("joint_blocks.{}.x_block.attn.proj.*", "transformer_blocks.{}.attn.to_out.0.*", "copy"),
    ("joint_blocks.{}.x_block.attn2.qkv.*", ("transformer_blocks.{}.attn2.to_q.*",
                                             "transformer_blocks.{}.attn2.to_k.*",
                                             "transformer_blocks.{}.attn2.to_v.*"), "qkv"),
    ("joint_blocks.{}.x_block.attn2.ln_q.*", "transformer_blocks.{}.attn2.norm_q.*", "copy"),
    ("joint_blocks.{}.x_block.attn2.ln_k.*", "transformer_blocks.{}.attn2.norm_k.*", "copy"),
    ("joint_blocks.{}.x_block.attn2.proj.*", "transformer_blocks.{}.attn2.to_out.0.*", "copy"),
    ("joint_blocks.{}.x_block.mlp.fc1.*", "transformer_blocks.{}.ff.net.0.proj.*", "copy"),
    ("joint_blocks.{}.x_block.mlp.fc2.*", "transformer_blocks.{}.ff.net.2.*", "copy"),
    ("joint_blocks.{}.context_block.adaLN_modulation.1.*", "transformer_blocks.{}.norm1_context.linear.*", "adaln"),
    ("joint_blocks.{}.context_block.attn.qkv.*", ("transformer_blocks.{}.attn.add_q_proj.*",
                                                  "transformer_blocks.{}.attn.add_k_proj.*",
                                                  "transformer_blocks.{}.attn.add_v_proj.*"), "qkv"),
    ("joint_blocks.{}.context_block.attn.ln_q.*", "transformer_blocks.{}.attn.norm_added_q.*", "copy"),
    ("joint_blocks.{}.context_block.attn.ln_k.*", "transformer_blocks.{}.attn.norm_added_k.*", "copy"),
    ("joint_blocks.{}.context_block.attn.proj.*", "transformer_blocks.{}.attn.to_add_out.*", "copy"),
    ("joint_blocks.{}.context_block.mlp.fc1.*", "transformer_blocks.{}.ff_context.net.0.proj.*", "copy"),
    ("joint_blocks.{}.context_block.mlp.fc2.*", "transformer_blocks.{}.ff_context.net.2.*", "copy"),
    ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "adaln"),
    ("final_layer.linear.*", "proj_out.*", "copy"),
]


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (original) names."""
    need = lambda k: need_key(s, k, where, "SD3")  # noqa: E731
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


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers transformer config.json (None where it is silent)."""
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
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
    return f
