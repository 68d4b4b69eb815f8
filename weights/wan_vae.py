"""Load Qwen-Image's VAEs (1.0: Wan 2.1 architecture; 2.1: Wan 2.2's, made 2-D) from every layout.

* diffusers: a ``vae/`` folder (``AutoencoderKLQwenImage`` / ``AutoencoderKLQwenImage21``), its
  ``diffusion_pytorch_model.safetensors`` alone, or the same names under ComfyUI's ``vae.`` prefix;
* Wan's original names, as ComfyUI ships the files: 1.0 ``qwen_image_vae.safetensors`` (Wan 2.1:
  ``encoder.downsamples.{n}``, flat), 2.1 (Wan 2.2: ``encoder.downsamples.{i}.downsamples.{j}``).

Our modules are 2-D (see ``mmdit.encoders.wan_vae``): a 5-D conv weight loads as its last temporal
tap, a norm's ``gamma`` as (C, 1, 1); the ``time_conv`` tensors (video only) must be in the file,
with the right shapes, and are not kept. Without a config.json the architecture is read off the
shapes and the latent statistics come from the Qwen-Image presets.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..encoders.qwen21_vae import QWEN_IMAGE_21_VAE_PRESETS, QwenImage21VAE, QwenImage21VAEConfig
from ..encoders.wan_vae import QWEN_IMAGE_VAE_PRESETS, QwenImageVAE, QwenImageVAEConfig
from .checkpoint import Checkpoint, CheckpointError, count_indexed, load_into, mismatches

QWEN_VAE_CLASSES = {"AutoencoderKLQwenImage": "qwen-image", "AutoencoderKLQwenImage21": "qwen-image-2.1"}

# Wan name <-> ours (diffusers), as prefixes. PART: inside encoder. / decoder.; a True marks a
# residual block, whose inner names differ too (RESNET: Wan's `residual` is a Sequential of norm,
# SiLU, conv, norm, SiLU, dropout, conv, so its indices skip the parameter-free layers).
TOP = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
PART = [("conv1.", "conv_in.", False), ("head.0.", "norm_out.", False), ("head.2.", "conv_out.", False),
        ("middle.0.", "mid_block.resnets.0.", True), ("middle.1.", "mid_block.attentions.0.", False),
        ("middle.2.", "mid_block.resnets.1.", True)]
RESNET = [("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
          ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")]
SAMPLER = ("resample.", "time_conv.")  # a down/upsampler's names, the same on both sides
# Wan: 1.0 `encoder.downsamples.{n}` (flat), 2.1 `encoder.downsamples.{i}.downsamples.{j}` (nested)
_WAN_BLOCK = re.compile(r"(?P<part>encoder|decoder)\.(?:down|up)samples\.(?P<i>\d+)\."
                        r"(?:(?:down|up)samples\.(?P<j>\d+)\.)?(?P<rest>.*)$")
# ours: `encoder.down_blocks.{n}` (1.0 flat), `*_blocks.{i}.resnets.{j}`, `.upsamplers.0`, `.downsampler`, `.upsampler`
_OUR_BLOCK = re.compile(r"(?P<part>encoder|decoder)\.(?:down|up)_blocks\.(?P<i>\d+)\."
                        r"(?:(?P<sub>resnets\.(?P<j>\d+)|upsamplers\.0|downsampler|upsampler)\.)?(?P<rest>.*)$")


def _swap(name: str, table, to_ours: bool) -> str | None:
    for row in table:
        src, dst = (row[0], row[1]) if to_ours else (row[1], row[0])
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def _inner(rest: str, to_ours: bool) -> tuple[str, str] | None:
    """("resnet" | "sampler", the name inside a block on the other side), None if neither."""
    if rest.startswith(SAMPLER):
        return "sampler", rest
    inner = _swap(rest, RESNET, to_ours)
    return None if inner is None else ("resnet", inner)


def wan_key(key: str, arch: str, res_blocks: int, to: str) -> str | None:
    """One VAE key between Wan's names and ours: ``to`` = "ours" or "wan"; ``arch`` = "qwen-image"
    (flat blocks) or "qwen-image-2.1" (nested); ``res_blocks`` = the config's num_res_blocks (r:
    a 1.0 decoder stage is r + 1 resnets and an upsampler; a 2.1 encoder stage r resnets and a
    downsampler, a decoder stage r + 1 and an upsampler). None when the key is no name of that side."""
    to_ours, r = to == "ours", res_blocks
    top = _swap(key, TOP, to_ours)
    if top is not None:
        return top
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    for wan, ours, resnet in PART:
        src, dst = (wan, ours) if to_ours else (ours, wan)
        if rest.startswith(src):
            inner = _swap(rest[len(src):], RESNET, to_ours) if resnet else rest[len(src):]
            return None if inner is None else f"{part}.{dst}{inner}"
    nested = arch == "qwen-image-2.1"
    m = (_WAN_BLOCK if to_ours else _OUR_BLOCK).match(key)
    found = m and _inner(m["rest"], to_ours)
    if not found:
        return None
    kind, inner = found
    i = int(m["i"])
    if to_ours:
        blocks, j = ("down_blocks" if part == "encoder" else "up_blocks"), m["j"]
        if (j is not None) != nested:
            return None
        if nested:
            where = f"resnets.{j}" if kind == "resnet" else ("downsampler" if part == "encoder" else "upsampler")
        elif part == "encoder":  # 1.0: the encoder's list is flat on both sides
            return f"{part}.{blocks}.{i}.{inner}"
        else:
            b, j = divmod(i, r + 2)
            where = f"resnets.{j}" if kind == "resnet" else "upsamplers.0"
            i = b
        return f"{part}.{blocks}.{i}.{where}.{inner}"
    blocks, sub = ("downsamples" if part == "encoder" else "upsamples"), m["sub"]
    resnet = sub is not None and sub.startswith("resnets.") and kind == "resnet"
    sampler = sub in ("upsamplers.0", "downsampler", "upsampler") and kind == "sampler"
    if nested and (resnet or (sampler and sub != "upsamplers.0")):
        j = int(m["j"]) if resnet else r + (part == "decoder")
        return f"{part}.{blocks}.{i}.{blocks}.{j}.{inner}"
    if not nested and part == "encoder" and sub is None:
        return f"{part}.{blocks}.{i}.{inner}"
    if not nested and part == "decoder" and (resnet or sub == "upsamplers.0" and sampler):
        return f"{part}.{blocks}.{i * (r + 2) + (int(m['j']) if resnet else r + 1)}.{inner}"
    return None


def qwen_vae_arch(keys, cj: dict | None) -> str | None:
    """"qwen-image" / "qwen-image-2.1" when these keys (prefix removed) or this config.json are
    one of Qwen-Image's VAEs, in any layout; None otherwise."""
    if cj and cj.get("_class_name") in QWEN_VAE_CLASSES:
        return QWEN_VAE_CLASSES[cj["_class_name"]]
    keys = list(keys)
    if not any(k.endswith(".gamma") for k in keys):
        return None
    nested = any(k.startswith(("encoder.down_blocks.0.resnets.", "encoder.downsamples.0.downsamples.")) for k in keys)
    return "qwen-image-2.1" if nested else "qwen-image"


def fold_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A checkpoint shape as our 2-D module holds it: 5-D convs lose the time axis, gammas are (C, 1, 1)."""
    if name.endswith(".gamma") and all(s == 1 for s in shape[1:]):
        return (shape[0], 1, 1)
    return shape[:2] + shape[3:] if len(shape) == 5 else shape


def fold(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor for ``fold_shape``: a 5-D conv weight's last temporal tap (the one that sees the frame)."""
    if name.endswith(".gamma"):
        return t.reshape(fold_shape(name, tuple(t.shape)))
    return t[:, :, -1] if t.ndim == 5 else t


def load_qwen_vae(ckpt: Checkpoint, cj: dict | None, prefix: str, family: str | None, dtype, device,
                  where: str) -> QwenImageVAE:
    """The VAE in ``ckpt`` (keys under ``prefix``); ``family`` ("qwen-image" / "qwen-image-2.1" or
    None) must agree with what the file holds."""
    keys = [k[len(prefix):] for k in ckpt if k.startswith(prefix)]
    arch = qwen_vae_arch(keys, cj)
    if arch is None:
        raise CheckpointError(f"{where} holds no Qwen-Image VAE (no RMS-norm `gamma` keys"
                              f"{' under ' + repr(prefix) if prefix else ''}; found e.g. {sorted(keys)[:4]})")
    if family is not None and family != arch:
        raise CheckpointError(f"{where} holds the {arch} VAE, not the {family} one; pass family={arch!r} or omit it")
    wan = any(k.startswith("decoder.middle.") for k in keys)
    layout = ("Wan 2.2 (ComfyUI) names" if arch == "qwen-image-2.1" else "Wan 2.1 (ComfyUI) names") if wan \
        else "diffusers names"
    layout = f"{arch} VAE, {layout}" + (f" (prefix {prefix!r})" if prefix else "")
    res = _wan_res_blocks(keys, arch) if wan else 0
    names = {(wan_key(k, arch, res, "ours") or k) if wan else k: prefix + k for k in keys}
    shapes = {ours: fold_shape(ours, ckpt.shape(theirs)) for ours, theirs in names.items()}
    cfg = _config(arch, shapes, cj, where)
    with torch.device("meta"):
        model = (QwenImage21VAE if arch == "qwen-image-2.1" else QwenImageVAE)(cfg)
    video = model.video_only()
    expected = {**{k: tuple(v.shape) for k, v in model.state_dict().items()}, **video}
    theirs = (lambda ours: prefix + (wan_key(ours, arch, cfg.num_res_blocks, "wan") or ours)) if wan else \
        (lambda ours: prefix + ours)
    problems = mismatches({theirs(k): s for k, s in expected.items()}, {names[k]: s for k, s in shapes.items()})
    if problems:  # named as the file names them
        raise CheckpointError("\n  ".join([f"checkpoint does not match the model (detected layout: {layout} in "
                                            f"{where}; 5-D shapes shown without their time axis)", *problems]))
    load_into(model, {ours: (lambda o=ours: fold(o, ckpt[names[o]])) for ours in names if ours not in video},
              shapes, dtype=dtype, device=device, layout=f"{layout} in {where}")
    return model.eval()


def _wan_res_blocks(keys: list[str], arch: str) -> int:
    """num_res_blocks from Wan names: 1.0's flat encoder list has its first resampler after them."""
    if arch == "qwen-image-2.1":
        return count_indexed(keys, "encoder.downsamples.0.downsamples.{}.residual.") or 1
    samplers = [int(m[1]) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", k))]
    return min(samplers) if samplers else count_indexed(keys, "encoder.downsamples.{}.")


# --- configs: from config.json, else from shapes ----------------------------------------------------

def _need(shapes: Mapping, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{where} is missing {key!r} (or its Wan name), needed to infer the VAE architecture")
    return shapes[key]


def _config(arch: str, shapes: Mapping, cj: dict | None, where: str) -> QwenImageVAEConfig | QwenImage21VAEConfig:
    base, c_in = _need(shapes, "encoder.conv_in.weight", where)[:2]
    fields = dict(base_dim=base, in_channels=c_in, z_dim=_need(shapes, "post_quant_conv.weight", where)[0])
    if arch == "qwen-image":
        cls, preset = QwenImageVAEConfig, QWEN_IMAGE_VAE_PRESETS["qwen-image"]
        blocks = count_indexed(shapes, "encoder.down_blocks.{}.")
        samplers = [n for n in range(blocks) if f"encoder.down_blocks.{n}.resample.1.weight" in shapes]
        res = samplers[0] if samplers else blocks
        fields.update(num_res_blocks=res, temporal_downsample=tuple(
            f"encoder.down_blocks.{n}.time_conv.weight" in shapes for n in samplers),
            dim_mult=tuple(_need(shapes, f"encoder.down_blocks.{s * (res + 1)}.conv1.weight", where)[0] // base
                           for s in range(len(samplers) + 1)))
        json_fields = [("base_dim", "base_dim"), ("z_dim", "z_dim"), ("dim_mult", "dim_mult"),
                       ("num_res_blocks", "num_res_blocks"), ("temporal_downsample", "temperal_downsample"),
                       ("in_channels", "input_channels")]
    else:
        cls, preset = QwenImage21VAEConfig, QWEN_IMAGE_21_VAE_PRESETS["qwen-image-2.1"]
        stages = count_indexed(shapes, "encoder.down_blocks.{}.")
        dim_mult = tuple(_need(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", where)[0] // base
                         for i in range(stages))
        out, dec = _need(shapes, "decoder.conv_out.weight", where)[:2]
        fields.update(num_res_blocks=count_indexed(shapes, "encoder.down_blocks.0.resnets.{}."), dim_mult=dim_mult,
                      temporal_downsample=tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in shapes
                                                for i in range(stages - 1)),
                      decoder_base_dim=dec // max(dim_mult[0], 1), out_channels=out)
        json_fields = [("base_dim", "base_dim"), ("decoder_base_dim", "decoder_base_dim"), ("z_dim", "z_dim"),
                       ("dim_mult", "dim_mult"), ("num_res_blocks", "num_res_blocks"),
                       ("temporal_downsample", "temperal_downsample"), ("in_channels", "in_channels"),
                       ("out_channels", "out_channels")]
        if cj and (cj.get("is_residual") is False or cj.get("patch_size") not in (None, 1)):
            raise CheckpointError(f"{where}: only the residual, unpatchified Qwen-Image 2.1 VAE is supported "
                                  f"(config.json has is_residual={cj.get('is_residual')}, "
                                  f"patch_size={cj.get('patch_size')})")
    if cj:
        if cj.get("attn_scales"):
            raise CheckpointError(f"{where}: attention inside the VAE stages (attn_scales={cj['attn_scales']}) is not "
                                  "supported; no released Qwen-Image VAE uses it")
        for ours, theirs in json_fields:
            if cj.get(theirs) is not None:
                fields[ours] = tuple(cj[theirs]) if isinstance(cj[theirs], list) else cj[theirs]
    if cj and cj.get("latents_mean") is not None:
        fields.update(latents_mean=tuple(cj["latents_mean"]), latents_std=tuple(cj["latents_std"]))
    elif fields["z_dim"] == preset.z_dim:
        fields.update(latents_mean=preset.latents_mean, latents_std=preset.latents_std)
    else:
        raise CheckpointError(f"{where} has {fields['z_dim']} latent channels, the {arch} preset's statistics "
                              f"{preset.z_dim}: put the file in a folder with its config.json (latents_mean/std)")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inferred an impossible {cls.__name__} ({e})") from None
