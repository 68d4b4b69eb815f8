"""Load the CLIP / T5 text encoders and the VAE from every layout they ship in.

* a diffusers pipeline folder (``text_encoder*/`` picked by ``kind``, ``vae/``) or one of its
  component folders (``config.json`` + ``model.safetensors`` or shards + ``*.index.json``);
* a Stability all-in-one file: ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` and
  ``first_stage_model.*`` (or ComfyUI's ``vae.*``), next to the transformer;
* standalone files: ``clip_l/clip_g/t5xxl_*.safetensors`` (transformers names, with or without
  CLIP's ``text_model.`` prefix) and ``ae.safetensors`` (LDM names; FLUX.1 and FLUX.2).

Qwen-Image's VAEs (config.json ``_class_name`` ``AutoencoderKLQwenImage*``, or RMS-norm ``gamma``
keys) are handed to ``mmdit.weights.wan_vae``.

Without a config.json the architecture is read off the shapes. Models are built on ``meta``
and tensors stream in one at a time (cast per tensor, float8 upcast); a missing, unexpected
or mis-shaped key is one :class:`CheckpointError` naming the keys and the detected layout.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from ..encoders.clip import CLIPConfig, CLIPTextEncoder
from ..encoders.decoder_lm import DecoderLM
from ..encoders.qwen21_vae import QWEN_IMAGE_21_VAE_PRESETS, QwenImage21VAE
from ..encoders.t5 import T5Config, T5Encoder
from ..encoders.vae import VAE, VAE_PRESETS, VAEConfig
from ..encoders.wan_vae import QWEN_IMAGE_VAE_PRESETS, QwenImageVAE
from .checkpoint import Checkpoint, CheckpointError, count_indexed, load_into, open_checkpoint, read_json
from .decoder_lm import is_decoder_lm, load_decoder_lm
from .wan_vae import QWEN_VAE_CLASSES, load_qwen_vae, qwen_vae_arch

TEXT_ENCODER_PREFIXES = {  # kind -> prefix inside Stability all-in-one files
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
VAE_PREFIXES = ("first_stage_model.", "vae.")
VAE_FAMILIES = (*VAE_PRESETS, *QWEN_IMAGE_VAE_PRESETS, *QWEN_IMAGE_21_VAE_PRESETS)
_KL_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")
_VAE_IGNORED = {"bn.num_batches_tracked"}  # FLUX.2's BatchNorm counter: training only, not always saved
_CLIP_IGNORED = {"embeddings.position_ids"}  # a buffer older transformers versions saved
_CLIP_OTHER_TOWER = ("vision_model.", "visual_projection.", "logit_scale")  # a full CLIPModel file

# LDM name <-> diffusers name. {i}: resolution level, {j}: block, {u} = levels-1-i (diffusers
# numbers the decoder's levels from the bottom of the U up). Specific rows come first.
VAE_KEYMAP: list[tuple[str, str]] = [
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsamplers.0.conv."),
    ("decoder.up.{i}.block.{j}.nin_shortcut.", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{u}.resnets.{j}."),
    ("decoder.up.{i}.upsample.conv.", "decoder.up_blocks.{u}.upsamplers.0.conv."),
] + [row for part in ("encoder", "decoder") for row in [
    (f"{part}.conv_in.", f"{part}.conv_in."),
    (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
    (f"{part}.mid.attn_1.norm.", f"{part}.mid_block.attentions.0.group_norm."),
    (f"{part}.mid.attn_1.q.", f"{part}.mid_block.attentions.0.to_q."),
    (f"{part}.mid.attn_1.k.", f"{part}.mid_block.attentions.0.to_k."),
    (f"{part}.mid.attn_1.v.", f"{part}.mid_block.attentions.0.to_v."),
    (f"{part}.mid.attn_1.proj_out.", f"{part}.mid_block.attentions.0.to_out.0."),
    (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
    (f"{part}.norm_out.", f"{part}.conv_norm_out."),
    (f"{part}.conv_out.", f"{part}.conv_out."),
]] + [("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv."),  # FLUX.2
     ("bn.", "bn.")]
_VAE_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # LDM (C,C,1,1) vs diffusers (C,C)


def _regex(template: str) -> re.Pattern:
    body = re.escape(template)
    for g in "iju":
        body = body.replace(re.escape(f"{{{g}}}"), f"(?P<{g}>\\d+)")
    return re.compile(body + "(?P<rest>.*)$")


_VAE_RX = [(_regex(ldm), _regex(dif), ldm, dif) for ldm, dif in VAE_KEYMAP]


def vae_key(key: str, levels: int, to: str) -> str | None:
    """One VAE key to ``to`` = "diffusers" or "ldm"; None when no row of the table matches."""
    for rx_ldm, rx_dif, ldm, dif in _VAE_RX:
        m = (rx_ldm if to == "diffusers" else rx_dif).match(key)
        if m:
            g = {k: int(v) for k, v in m.groupdict().items() if k != "rest"}
            if "i" in g:
                g["u"] = levels - 1 - g["i"]
            elif "u" in g:
                g["i"] = levels - 1 - g["u"]
            return (dif if to == "diffusers" else ldm).format(**g) + m["rest"]
    return None


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """LDM-named VAE state dict -> diffusers names (1x1 attention convs squeezed to linears)."""
    return {vae_key(k, levels, "diffusers"): (v.flatten(1) if _VAE_ATTN_WEIGHT.search(k) else v)
            for k, v in sd.items()}


def vae_to_ldm(sd: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers-named VAE state dict -> LDM names (the inverse of :func:`vae_to_diffusers`)."""
    out = {}
    for k, v in sd.items():
        ours = vae_key(k, levels, "ldm")
        out[ours] = v[:, :, None, None] if _VAE_ATTN_WEIGHT.search(ours) else v
    return out


# --- public loaders ----------------------------------------------------------------------------

def load_text_encoder(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu",
                      kind: str | None = None) -> CLIPTextEncoder | T5Encoder | DecoderLM:
    """A CLIP or T5 text encoder from a folder or a file (see the module docstring), or the
    decoder LM of FLUX.2 / Qwen-Image (``mmdit.weights.decoder_lm.load_decoder_lm``).

    ``kind`` ("clip_l", "clip_g", "t5xxl") picks the component of a pipeline folder or an
    all-in-one file; elsewhere it is checked against what the file holds. fp16 keeps T5's
    ``wo`` in fp32 (as transformers does).
    """
    if kind is not None and kind not in TEXT_ENCODER_PREFIXES:
        raise ValueError(f"kind must be one of {sorted(TEXT_ENCODER_PREFIXES)} or None, got {kind!r}")
    path = _existing(source)
    if kind is None and is_decoder_lm(path):
        return load_decoder_lm(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "model_index.json").is_file():
        path = _pipeline_text_encoder(path, kind)
    ckpt, cj, where = _open(path, stem="model")
    prefix, family, layout = _text_encoder_prefix(ckpt, kind, where)
    if family == "clip":
        names = _clip_names(ckpt, prefix, where)
        shapes = {ours: ckpt.shape(theirs) for ours, theirs in names.items()}
        with torch.device("meta"):
            model = CLIPTextEncoder(_clip_config(shapes, cj, where))
    else:
        names = _t5_names(ckpt, prefix, where)
        shapes = {ours: ckpt.shape(theirs) for ours, theirs in names.items()}
        with torch.device("meta"):
            model = T5Encoder(_t5_config(shapes, cj, where))
    cast = _t5_fp16 if family == "t5" and dtype == torch.float16 else dtype
    _load(model, ckpt, names, shapes, cast, device, f"{layout} in {where}")
    return model.eval()


def _t5_fp16(name: str) -> torch.dtype:
    """fp16 T5: wo in fp32 (as ``T5Encoder.keep_wo_fp32`` keeps it), read as fp32, not upcast."""
    return torch.float32 if name.endswith("DenseReluDense.wo.weight") else torch.float16


def load_vae(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu",
             family: str | None = None) -> VAE | QwenImageVAE | QwenImage21VAE:
    """A VAE from a diffusers folder (or its ``vae/``), a single file, or an all-in-one file:
    the AutoencoderKL of SD3 / FLUX.1 (``first_stage_model.*``, ``ae.safetensors``), FLUX.2's
    (``ae.safetensors`` or ``AutoencoderKLFlux2``), Qwen-Image 1.0's and 2.1's (diffusers, or
    ComfyUI's Wan-named files; see ``mmdit.weights.wan_vae``).

    ``family`` ("sd3", "flux", "flux2", "qwen-image", "qwen-image-2.1") must agree with the file;
    SD3 and FLUX.1 share an architecture, so for them it picks scaling_factor / shift_factor (else
    config.json's, or SD3's for a Stability all-in-one file; otherwise it is an error).
    Every VAE returned has ``config.latent_channels`` / ``downsample`` and ``encode``, ``decode``,
    ``normalize``, ``denormalize`` (see ``mmdit.encoders.vae``).
    """
    if family is not None and family not in VAE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(VAE_FAMILIES)} or None, got {family!r}")
    path = _existing(source)
    if path.is_dir() and (path / "model_index.json").is_file():
        if not (path / "vae").is_dir():
            raise CheckpointError(f"{path} is a diffusers pipeline folder without a vae/ subfolder")
        path = path / "vae"
    ckpt, cj, where = _open(path, stem="diffusion_pytorch_model")
    kind = (cj or {}).get("_class_name")
    if kind is not None and kind not in (*_KL_CLASSES, *QWEN_VAE_CLASSES):
        known = sorted((*_KL_CLASSES, *QWEN_VAE_CLASSES))
        raise CheckpointError(f"{where} is a {kind}; the VAEs loaded here are {known}")
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in ckpt)), "")
    keys = [k[len(prefix):] for k in ckpt if k.startswith(prefix)]
    if family in (*QWEN_IMAGE_VAE_PRESETS, *QWEN_IMAGE_21_VAE_PRESETS) or qwen_vae_arch(keys, cj) is not None:
        return load_qwen_vae(ckpt, cj, prefix, family, dtype, device, where)
    keys = [k for k in keys if k not in _VAE_IGNORED]
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        layout, levels = "diffusers VAE", count_indexed(keys, "encoder.down_blocks.{}.")
        names = {(vae_key(k, levels, "ldm") or k): prefix + k for k in keys}
    elif "encoder.conv_in.weight" in keys and any(k.startswith("encoder.down.") for k in keys):
        layout, names = "LDM VAE", {k: prefix + k for k in keys}
    else:
        raise CheckpointError(f"{where} holds no VAE (no encoder.down.* or encoder.down_blocks.* keys"
                              f"{' under ' + repr(prefix) if prefix else ''}; found e.g. {_some(ckpt)})")
    shapes = {}
    for ours, theirs in names.items():
        s = ckpt.shape(theirs)
        shapes[ours] = s + (1, 1) if _VAE_ATTN_WEIGHT.search(ours) and len(s) == 2 else s
    cfg = _vae_config(shapes, cj, family, prefix, where)
    with torch.device("meta"):
        model = VAE(cfg)
    layout += f" (prefix {prefix!r})" if prefix else ""
    _load(model, ckpt, names, shapes, _vae_dtype(dtype), device, f"{layout} in {where}",
          fix=lambda name, t: t.reshape(shapes[name]))
    return model.eval()


def _vae_dtype(dtype: torch.dtype):
    """FLUX.2's latent statistics stay float32 (bf16 would round them to ~3 significant digits)."""
    return lambda name: torch.float32 if name.startswith("bn.") else dtype


# --- opening and picking components ------------------------------------------------------------

def _existing(source) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a .safetensors file, an *.index.json, or a folder")
    return path


def _open(path: Path, stem: str) -> tuple[Checkpoint, dict | None, str]:
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not any(path.glob(f"{stem}*.safetensors*")):
        stem = None  # a folder of other file names: open_checkpoint lists what it finds
    ckpt = open_checkpoint(path, stem if path.is_dir() else None)
    cj = None
    if path.is_dir() or path.name.startswith(("model", "diffusion_pytorch")):
        cj = read_json(folder / "config.json")
    return ckpt, cj, str(path)


def _pipeline_text_encoder(root: Path, kind: str | None) -> Path:
    """text_encoder/ is CLIP-L; the next CLIP is bigG (SD3 text_encoder_2); the T5 is t5xxl."""
    found, clips = {}, 0
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        cfg = read_json(root / sub / "config.json")
        if cfg is None:
            continue
        is_t5 = cfg.get("model_type") == "t5"
        found["t5xxl" if is_t5 else ("clip_l", "clip_g")[min(clips, 1)]] = root / sub
        clips += not is_t5
    if kind in found:
        return found[kind]
    raise CheckpointError(f"{root} is a pipeline folder with text encoders {sorted(found)}; "
                          + ("pass kind= one of them" if kind is None else f"it has no {kind!r}"))


def _text_encoder_prefix(ckpt: Checkpoint, kind: str | None, where: str) -> tuple[str, str, str]:
    """(prefix, "clip" | "t5", layout description)."""
    if "scaled_fp8" in ckpt:
        raise CheckpointError(f"{where} is a ComfyUI 'scaled fp8' checkpoint, which needs per-tensor scales; "
                              "use the fp16 or plain float8_e4m3fn file")
    present = [k for k, p in TEXT_ENCODER_PREFIXES.items() if any(n.startswith(p) for n in ckpt)]
    if present:
        if kind is None and len(present) > 1:
            raise CheckpointError(f"{where} holds the text encoders {present}; pass kind= one of them")
        pick = kind or present[0]
        if pick not in present:
            raise CheckpointError(f"{where} has no {pick!r} text encoder (it holds {present})")
        prefix, layout = TEXT_ENCODER_PREFIXES[pick], f"Stability all-in-one ({TEXT_ENCODER_PREFIXES[pick]})"
    else:
        prefix, layout = "", "transformers names"
    names = [n[len(prefix):] for n in ckpt if n.startswith(prefix)]
    if any(n.endswith("embeddings.token_embedding.weight") for n in names):
        family = "clip"
    elif any(n.startswith("encoder.block.") for n in names):
        family = "t5"
    else:
        raise CheckpointError(f"{where} holds no CLIP or T5 text encoder (found e.g. {_some(ckpt)})")
    if kind is not None and (family == "t5") != (kind == "t5xxl"):
        raise CheckpointError(f"{where} holds a {family.upper()} text encoder, not {kind!r}")
    return prefix, family, f"{family.upper()}, {layout}"


# --- names: ours -> the checkpoint's --------------------------------------------------------------

def _clip_names(ckpt: Checkpoint, prefix: str, where: str) -> dict[str, str]:
    names = {}
    for theirs in ckpt:
        if not theirs.startswith(prefix):
            continue
        ours = theirs[len(prefix):]
        ours = ours[len("text_model."):] if ours.startswith("text_model.") else ours  # transformers < 5 nesting
        if ours in _CLIP_IGNORED or ours.startswith(_CLIP_OTHER_TOWER):
            continue
        if ours in names:
            raise CheckpointError(f"{where} holds both {names[ours]!r} and {theirs!r}")
        names[ours] = theirs
    return names


def _t5_names(ckpt: Checkpoint, prefix: str, where: str) -> dict[str, str]:
    names = {}
    for theirs in ckpt:
        if not theirs.startswith(prefix):
            continue
        ours = theirs[len(prefix):]
        if ours.startswith(("decoder.", "lm_head.")):  # a full T5: we only need its encoder
            continue
        names[ours] = theirs
    tied = names.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight in transformers
    if tied is not None:
        names.setdefault("shared.weight", tied)
    return names


# --- configs: from config.json, else from shapes ----------------------------------------------

def _need(shapes: Mapping, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{where} is missing {key!r}, needed to infer the architecture")
    return shapes[key]


def _clip_config(shapes: Mapping, cj: dict | None, where: str) -> CLIPConfig:
    vocab, width = _need(shapes, "embeddings.token_embedding.weight", where)
    fields = dict(vocab_size=vocab, width=width,
                  max_positions=_need(shapes, "embeddings.position_embedding.weight", where)[0],
                  num_layers=count_indexed(shapes, "encoder.layers.{}."),
                  mlp_dim=_need(shapes, "encoder.layers.0.mlp.fc1.weight", where)[0],
                  num_heads=max(width // 64, 1),  # 64-wide heads in both CLIP-L and bigG
                  activation="quick_gelu" if width == 768 else "gelu",  # OpenAI CLIP-L vs OpenCLIP
                  projection_dim=shapes["text_projection.weight"][0] if "text_projection.weight" in shapes else None,
                  eos_token_id=vocab - 1)  # <|endoftext|> is CLIP's last token (49407)
    if cj:
        cj = cj.get("text_config", cj)
        for ours, theirs in [("vocab_size", "vocab_size"), ("width", "hidden_size"),
                             ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                             ("mlp_dim", "intermediate_size"),
                             ("max_positions", "max_position_embeddings"), ("activation", "hidden_act"),
                             ("eps", "layer_norm_eps"), ("eos_token_id", "eos_token_id")]:
            if cj.get(theirs) is not None:
                fields[ours] = cj[theirs]
    return _build(CLIPConfig, fields, where)


def _t5_config(shapes: Mapping, cj: dict | None, where: str) -> T5Config:
    gated = (cj or {}).get("feed_forward_proj", "gated-gelu") == "gated-gelu"
    if not gated or "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise CheckpointError(f"{where} is an original T5 (non-gated feed-forward); only T5 v1.1 "
                              "(gated-gelu, as in SD3 / FLUX) is supported")
    vocab, d_model = _need(shapes, "shared.weight", where)
    buckets, heads = _need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", where)
    fields = dict(vocab_size=vocab, d_model=d_model, num_layers=count_indexed(shapes, "encoder.block.{}."),
                  num_heads=heads, num_buckets=buckets,
                  d_kv=_need(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", where)[0] // heads,
                  d_ff=_need(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", where)[0])
    for ours, theirs in [("vocab_size", "vocab_size"), ("d_model", "d_model"), ("num_layers", "num_layers"),
                         ("num_heads", "num_heads"), ("d_kv", "d_kv"), ("d_ff", "d_ff"),
                         ("num_buckets", "relative_attention_num_buckets"),
                         ("max_distance", "relative_attention_max_distance"), ("eps", "layer_norm_epsilon")]:
        if cj and cj.get(theirs) is not None:
            fields[ours] = cj[theirs]
    return _build(T5Config, fields, where)


def _vae_config(shapes: Mapping, cj: dict | None, family: str | None, prefix: str, where: str) -> VAEConfig:
    levels = count_indexed(shapes, "encoder.down.{}.")
    z = _need(shapes, "decoder.conv_in.weight", where)[1]
    fields = dict(channels=tuple(_need(shapes, f"encoder.down.{i}.block.0.conv1.weight", where)[0]
                                 for i in range(levels)),
                  layers_per_block=count_indexed(shapes, "encoder.down.0.block.{}."),
                  in_channels=_need(shapes, "encoder.conv_in.weight", where)[1],
                  latent_channels=z,
                  out_channels=_need(shapes, "decoder.conv_out.weight", where)[0],
                  mid_attention="encoder.mid.attn_1.q.weight" in shapes,
                  quant_conv="encoder.quant_conv.weight" in shapes)
    flux2 = "bn.running_mean" in shapes  # FLUX.2: latent statistics, 2x2 patchify
    if flux2:
        stats = shapes["bn.running_mean"][0]
        patch = round((stats / z) ** 0.5)
        if patch * patch * z != stats:
            raise CheckpointError(f"{where}: bn statistics for {stats} channels do not fit {z} latent channels "
                                  "patchified p x p")
        fields.update(latent_channels=stats, patch_size=patch, batch_norm_eps=VAE_PRESETS["flux2"].batch_norm_eps,
                      scaling_factor=1.0, shift_factor=0.0)
    if fields["quant_conv"] != ("decoder.post_quant_conv.weight" in shapes):
        raise CheckpointError(f"{where} has only one of encoder.quant_conv / decoder.post_quant_conv; "
                              "this loader takes both or neither")
    if cj:
        if (cj.get("use_quant_conv") or cj.get("use_post_quant_conv")) and not flux2:
            raise CheckpointError(f"{where}: a VAE with quant convs (SD1/SDXL) is not the 16-channel SD3/FLUX VAE")
        if cj.get("decoder_block_out_channels") not in (None, cj.get("block_out_channels")):
            raise CheckpointError(f"{where}: a decoder with its own widths (decoder_block_out_channels="
                                  f"{cj['decoder_block_out_channels']}) is not supported")
        for ours, theirs in [("channels", "block_out_channels"), ("layers_per_block", "layers_per_block"),
                             ("in_channels", "in_channels"), ("out_channels", "out_channels"),
                             ("latent_channels", "latent_channels"), ("norm_groups", "norm_num_groups"),
                             ("mid_attention", "mid_block_add_attention"), ("batch_norm_eps", "batch_norm_eps")]:
            if cj.get(theirs) is not None and (ours != "batch_norm_eps" or flux2):
                fields[ours] = tuple(cj[theirs]) if ours == "channels" else cj[theirs]
        if flux2 and cj.get("latent_channels") is not None:  # diffusers counts them before the patchify
            fields["latent_channels"] = cj["latent_channels"] * fields["patch_size"] ** 2
        if flux2 and cj.get("patch_size") is not None and tuple(cj["patch_size"]) != (fields["patch_size"],) * 2:
            raise CheckpointError(f"{where}: config.json patch_size {cj['patch_size']} does not match the bn "
                                  f"statistics ({fields['patch_size']} x {fields['patch_size']})")
    if flux2 or family == "flux2":
        if family not in (None, "flux2") or not flux2:
            fix = "pass family='flux2' or omit it" if flux2 else "pass family='sd3' or family='flux'"
            held = "a FLUX.2 VAE (bn statistics, patchified latents)" if flux2 else "no FLUX.2 VAE (no bn.* statistics)"
            raise CheckpointError(f"{where} holds {held}; {fix}")
    elif family is not None:
        preset = VAE_PRESETS[family]
        fields.update(scaling_factor=preset.scaling_factor, shift_factor=preset.shift_factor)
    elif cj and cj.get("scaling_factor") is not None:
        fields.update(scaling_factor=cj["scaling_factor"], shift_factor=cj.get("shift_factor") or 0.0)
    elif prefix == "first_stage_model.":  # Stability all-in-one files are SD3 / SD3.5
        fields.update(scaling_factor=VAE_PRESETS["sd3"].scaling_factor, shift_factor=VAE_PRESETS["sd3"].shift_factor)
    else:
        raise CheckpointError(f"{where}: the SD3 and FLUX VAEs share an architecture but not their latent scaling; "
                              "pass family='sd3' or family='flux'")
    return _build(VAEConfig, fields, where)


def _build(cls, fields: dict, where: str):
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inferred an impossible {cls.__name__} ({e})") from None


# --- streaming -----------------------------------------------------------------------------------

def _load(model: torch.nn.Module, ckpt: Checkpoint, names: dict[str, str], shapes: dict, dtype, device,
          layout: str, fix=None) -> None:
    def read(ours: str) -> torch.Tensor:
        t = ckpt[names[ours]]
        return fix(ours, t) if fix is not None else t

    load_into(model, {ours: partial(read, ours) for ours in names}, shapes, dtype=dtype, device=device,
              layout=layout)


def _some(ckpt: Checkpoint, n: int = 4) -> list[str]:
    return sorted(ckpt)[:n]
