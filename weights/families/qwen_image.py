"""Qwen-Image 1.0 checkpoints: the official names are diffusers' names and ours, so the key table
is the identity; the config comes from shapes or from config.json.

See ``weights/families/__init__.py`` for what a family module holds. Official files, ComfyUI's
repackaged ones (``model.diffusion_model.`` or no prefix; fp8, scaled fp8) and diffusers folders
all hold these names: one "original" layout under different prefixes.
"""
from __future__ import annotations

from collections.abc import Mapping

from ...models.qwen_image import QwenImageConfig
from ..checkpoint import CheckpointError, count_indexed, need_key

FAMILY = "qwen-image"
NAME = "Qwen-Image 1.0"
CONFIG = QwenImageConfig
MARKERS = {"original": "txt_norm.weight"}  # the full-width text RMSNorm: no other family has it
DIFFUSERS_CLASSES = ("QwenImageTransformer2DModel",)
AXES = {128: (16, 56, 56)}  # the RoPE split of head_dim of the released model

_NAMES = [
    "img_in.*", "txt_norm.weight", "txt_in.*",
    "time_text_embed.timestep_embedder.linear_1.*", "time_text_embed.timestep_embedder.linear_2.*",
    *(f"transformer_blocks.{{}}.{m}" for m in (
        "img_mod.1.*", "txt_mod.1.*",
        "attn.to_q.*", "attn.to_k.*", "attn.to_v.*", "attn.to_out.0.*",
        "attn.add_q_proj.*", "attn.add_k_proj.*", "attn.add_v_proj.*", "attn.to_add_out.*",
        "attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight", "attn.norm_added_k.weight",
        "img_mlp.net.0.proj.*", "img_mlp.net.2.*", "txt_mlp.net.0.proj.*", "txt_mlp.net.2.*")),
    "norm_out.linear.*", "proj_out.*",
]
TABLE = [(name, name, "copy") for name in _NAMES]  # ours = official = diffusers (norm_out too: scale, shift)


def fields_from_shapes(s: Mapping, where: str) -> dict:
    """Config fields from the shapes of our (= official) names."""
    need = lambda k: need_key(s, k, where, "Qwen-Image")  # noqa: E731
    H, c_in = need("img_in.weight")
    head_dim = need("transformer_blocks.0.attn.norm_q.weight")[0]
    if H % head_dim:
        raise CheckpointError(f"{where}: hidden size {H} is not a multiple of head_dim {head_dim}")
    fields = dict(num_layers=count_indexed(s, "transformer_blocks.{}."), num_heads=H // head_dim,
                  head_dim=head_dim, in_channels=c_in, out_channels=need("proj_out.weight")[0] // 4,
                  context_dim=need("txt_in.weight")[1],
                  mlp_ratio=need("transformer_blocks.0.img_mlp.net.0.proj.weight")[0] / H)
    if head_dim in AXES:
        fields["axes_dim"] = AXES[head_dim]
    return fields


def fields_from_json(cj: dict, where: str) -> dict:
    """Config fields from a diffusers ``QwenImageTransformer2DModel`` config.json (None where silent)."""
    get = lambda name, default=None: cj.get(name) if cj.get(name) is not None else default  # noqa: E731
    if get("patch_size", 2) != 2:
        raise CheckpointError(f"{where}: config.json patch_size={cj['patch_size']}; Qwen-Image uses 2")
    variants = [k for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope") if get(k)]
    if variants:
        raise CheckpointError(f"{where}: config.json sets {variants}: a Qwen-Image variant (Edit-2511, Layered, "
                              "guidance) that this loader does not implement; only Qwen-Image 1.0 text-to-image")
    return dict(num_layers=get("num_layers"), num_heads=get("num_attention_heads"),
                head_dim=get("attention_head_dim"), in_channels=get("in_channels"),
                out_channels=get("out_channels"), context_dim=get("joint_attention_dim"),
                axes_dim=tuple(cj["axes_dims_rope"]) if get("axes_dims_rope") else None)


def finish_fields(fields: dict, where: str) -> dict:
    """The RoPE split can't be read from the weights unless head_dim is the released 128."""
    if "axes_dim" not in fields:
        raise CheckpointError(
            f"{where}: Qwen-Image head_dim is {fields.get('head_dim')}, and the RoPE split of the head dim "
            "(axes_dim) can't be read from the weights (it is (16, 56, 56) only for head_dim 128). "
            "Pass it, e.g. load_transformer(..., config={'axes_dim': (8, 12, 12)}), or add a config.json")
    return fields
