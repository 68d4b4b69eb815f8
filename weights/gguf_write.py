"""Writing GGUF files in ComfyUI-GGUF's layout (``mmdit quantize SRC OUT.gguf --type Q8_0``).

The file is what ComfyUI-GGUF's ``tools/convert.py`` followed by its patched ``llama-quantize``
would write, in one pass, one tensor in memory at a time. Names are the original single-file
names (ours) without prefix, in the source's order; per tensor:

  1-D, or at most 1024 values         F32 (F16 from an fp16 source)          convert.py
  kept by the architecture (KEEP)     BF16 from a bf16 source, else F16       convert.py's file type, which
  not 2-D (SD3 pos_embed, convs)        (convert.py writes fp32 and fp8       the quantizer leaves as is
  rows not a multiple of the block      sources as F16)                       (2-D only; K-quant fallback)
  every other 2-D weight              the --type (BF16 / F16: every tensor above too)

KVs, in order: ``general.architecture``, ``general.quantization_version`` = 2, ``general.file_type``.
Alignment 32, tensor data packed in table order. The quantizers are ``mmdit.ggml.quantize``
(bit for bit gguf-py's).
"""
from __future__ import annotations

import os
import struct
from collections import Counter
from pathlib import Path

import torch

from ..ggml import TYPES, GGMLType, quantize
from .gguf import ALIGNMENT, MAGIC

TARGETS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")  # what ``mmdit quantize --type`` writes
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}  # LlamaFileType
SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD
QUANT_VERSION = 2  # GGML_QUANT_VERSION
# general.architecture as ComfyUI-GGUF tags each family (FLUX.2 and Chroma load as "flux" there);
# a family not listed is tagged with its own name.
ARCH = {"sd3": "sd3", "flux": "flux", "flux2": "flux", "chroma": "flux", "qwen-image": "qwen_image"}
# Names (substrings) city96's llama-quantize leaves unquantized, per architecture (tools/lcpp.patch)
KEEP = {"flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
                 "single_stream_modulation.", "double_stream_modulation_"),
        "sd3": ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
                "x_embedder.", "proj_out.weight", "pos_embed"),
        "qwen_image": ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")}


def tensor_type(name: str, shape: tuple[int, ...], source: str, target: str, arch: str) -> str:
    """The GGML type a tensor is written in (see the module docstring). ``source``: the tensor's
    dtype in the source file as a torch name ("bfloat16", "float16", "float32", ...)."""
    n = 1
    for s in shape:
        n *= s
    if len(shape) <= 1 or n <= SMALL:
        return "F16" if source == "float16" else "F32"
    base = target if target in ("BF16", "F16") else "BF16" if source == "bfloat16" else "F16"
    kept = any(k in name for k in KEEP.get(arch, ()))
    if target in ("BF16", "F16") or len(shape) != 2 or shape[-1] % TYPES[target].block or kept:
        return base
    return target


def write_gguf(path: str | os.PathLike, arch: str, file_type: int, tensors: list) -> Path:
    """Write ``tensors``, a list of ``(name, type name, shape, make)`` where ``make()`` gives the
    values (any float dtype) or, for the plain types, the tensor itself. Atomic: written to
    ``<path>.part``, then renamed (a process reading the old file by memory map keeps it)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    kvs = [("general.architecture", 8, arch), ("general.quantization_version", 4, QUANT_VERSION),
           ("general.file_type", 4, file_type)]
    head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        head += _string(key) + struct.pack("<I", vtype)
        head += _string(value) if vtype == 8 else struct.pack("<I", value)
    offset = 0
    for name, qtype, shape, _ in tensors:
        head += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        head += struct.pack("<IQ", TYPES[qtype].id, offset)
        offset += _padded(TYPES[qtype].nbytes(shape))
    try:
        with open(part, "wb") as f:
            f.write(head + bytes(_padded(len(head)) - len(head)))
            for name, qtype, shape, make in tensors:
                data = _encode(make(), TYPES[qtype], shape, name)
                f.write(data)
                f.write(bytes(_padded(len(data)) - len(data)))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def _encode(t: torch.Tensor, gtype: GGMLType, shape: tuple[int, ...], name: str) -> bytes:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, planned {shape}")
    stored = quantize(t.detach().cpu(), gtype.name).contiguous()
    return stored.view(torch.uint8).numpy().tobytes()


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _padded(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# ---- mmdit quantize ------------------------------------------------------------------------

_SOURCE_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32",
                  "F8_E4M3": "float16", "F8_E5M2": "float16"}  # convert.py reads fp8 as fp16


def quantize_file(source: str | os.PathLike, out: str | os.PathLike, target: str = "Q8_0", config=None) -> str:
    """Write the transformer in ``source`` (anything ``load_transformer`` reads: safetensors in
    either layout, ComfyUI scaled fp8, a diffusers folder, another GGUF) to ``out`` as a GGUF in
    ComfyUI-GGUF's layout with 2-D weights in ``target``. ``config``: as in ``load_transformer``.
    Returns a summary line."""
    from functools import partial

    from ..models import transformer_for
    from . import keymaps
    from .detect import detect
    from .formats import Canonical
    from .hub import resolve
    from .transformer import _read, check_keys

    if target not in TARGETS:
        raise ValueError(f"--type {target} is not one mmdit writes; choose one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"{out}: the output must be a .gguf file")
    src = resolve(source)
    ckpt = Canonical(src.open(), str(src.path))
    det = detect(ckpt, src.config_json, config, where=str(src.path))
    with torch.device("meta"):
        check_keys(transformer_for(det.config), ckpt, det, where=str(src.path))
    arch = ARCH.get(det.family, det.family)
    hidden = det.config.hidden_size
    tensors = []
    for name, recipe in keymaps.recipes_for(det.keys, det.layout, det.family, det.prefix).items():
        shape = keymaps.combined_shape(recipe.op, [ckpt.shape(k) for k in recipe.keys])
        source_dtype = _SOURCE_DTYPES.get(ckpt.dtype(recipe.keys[0]), "bfloat16")  # GGUF sources: as bf16
        qtype = tensor_type(name, shape, source_dtype, target, arch)
        tensors.append((name, qtype, shape, partial(_read, ckpt, recipe, torch.float32, hidden)))
    if Path(src.path).resolve() == out.resolve():
        raise ValueError(f"{out} is the source file; write the GGUF somewhere else")
    write_gguf(out, arch, FILE_TYPES[target], tensors)
    counts = Counter(q for _, q, _, _ in tensors)
    size = sum(TYPES[q].nbytes(s) for _, q, s, _ in tensors)
    return (f"wrote {out}: {det.family} ({arch}), {len(tensors)} tensors "
            f"({', '.join(f'{q} {n}' for q, n in counts.most_common())}), {size / 2 ** 20:.1f} MiB of tensor data")
