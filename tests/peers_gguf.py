"""GGUF test files written with gguf-py (the reference), in ComfyUI-GGUF's layout.

Test-only (imports gguf). ``comfy_gguf`` does what ComfyUI-GGUF's ``tools/convert.py`` and its
patched ``llama-quantize`` do to an original-layout state dict, with gguf-py's writer and
quantizers; K-quants and IQ types, which gguf-py cannot produce, get random valid blocks.
It returns the file and the values it holds (``gguf.quants.dequantize``, fp32): the truth a
loader must reproduce.
"""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

QUANTIZABLE = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}  # gguf.quants.quantize writes these
ALL = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
       "BF16", "F16", "F32"]
# fp16 scale fields of each type (byte offset, magnitude that keeps the values near 0.05)
SCALES = {"Q8_0": [(0, 4e-4)], "Q4_0": [(0, 6e-3)], "Q4_1": [(0, 3e-3), (2, 2e-2)], "Q5_0": [(0, 3e-3)],
          "Q5_1": [(0, 1.5e-3), (2, 2e-2)], "Q2_K": [(80, 1e-3), (82, 1e-3)], "Q3_K": [(108, 4e-4)],
          "Q4_K": [(0, 5e-5), (2, 5e-4)], "Q5_K": [(0, 3e-5), (2, 5e-4)], "Q6_K": [(208, 1.2e-5)],
          "IQ4_NL": [(0, 4e-4)], "IQ4_XS": [(0, 1.2e-5)]}
FLUX_KEEP = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
SD3_KEEP = ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder.",
            "proj_out.weight", "pos_embed")


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """(n_blocks, type_size) uint8: random bytes, with small finite fp16 at the scale fields."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[T[qtype]][1]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at, mag in SCALES[qtype]:
        b[:, at:at + 2] = (rng.standard_normal(n_blocks) * mag).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b


def encode(x: np.ndarray, qtype: str, seed: int = 0) -> np.ndarray:
    """What gguf-py writes for ``x`` in ``qtype`` (random valid blocks of x's shape for K / IQ types)."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(x.astype(np.float32), T[qtype])
    block, size = gguf.GGML_QUANT_SIZES[T[qtype]]
    blocks = random_blocks(qtype, x.size // block, seed)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // block * size)


def values(data: np.ndarray, qtype: str, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, T[qtype]).astype(np.float32).reshape(shape).copy())


def comfy_type(name: str, shape, keep, pick, source: str = "bfloat16") -> str:
    """convert.py (1-D / small: F32 from a bf16 or fp32 source, F16 from fp16; the rest BF16 from
    bf16, F16 otherwise) then llama-quantize (2-D, not kept: ``pick(name)``; K / IQ types need rows
    of 256, else F16)."""
    n = int(np.prod(shape))
    if source != "float16" and (len(shape) == 1 or n <= 1024):
        return "F32"
    base = "BF16" if source == "bfloat16" else "F16"
    if pick is None or len(shape) != 2 or any(k in name for k in keep):
        return base
    q = pick(name)
    block = gguf.GGML_QUANT_SIZES[T[q]][0]
    return q if shape[-1] % block == 0 else "F16"


def comfy_gguf(path: Path, sd: dict[str, torch.Tensor], arch: str, pick=None, source: str = "bfloat16",
               prefix: str = "", kv: dict | None = None,
               file_type: int = gguf.LlamaFileType.GUESSED) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """Write ``sd`` (original names, no prefix) as ComfyUI-GGUF would. ``pick(name)`` -> the type of
    each quantized 2-D weight (None: the BF16/F16 file convert.py writes). Returns (path, the values
    stored per name in fp32, the type per name)."""
    keep = FLUX_KEEP if arch == "flux" else SD3_KEEP
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type)
    for k, v in (kv or {}).items():
        w.add_key_value(k, *v)
    stored, types = {}, {}
    for i, (name, t) in enumerate(sd.items()):
        x = t.detach().float().numpy()
        if source != "float32":
            x = t.detach().to(getattr(torch, source)).float().numpy()
        q = comfy_type(name, x.shape, keep, pick, source)
        data = encode(x, q, seed=i)
        w.add_tensor(prefix + name, data, raw_dtype=T[q])
        stored[name], types[name] = values(data, q, x.shape), q
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, stored, types


def cycle(types=tuple(ALL)):
    """A ``pick`` giving each successive quantized weight the next type of ``types``."""
    seen: dict[str, str] = {}

    def pick(name):
        return seen.setdefault(name, types[len(seen) % len(types)])
    return pick


# ---- raw files, for the malformed ones ------------------------------------------------------

def kv(key: str | bytes, vtype: int, payload: bytes) -> tuple[bytes, int, bytes]:
    """One metadata entry: the key, the value type id, the packed value."""
    return (key.encode() if isinstance(key, str) else key), vtype, payload


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def raw_gguf(path: Path, kvs=None, infos=None, data: bytes | None = None, version: int = 3, magic: bytes = b"GGUF",
             endian: str = "<", alignment: int = 32, cut: int | None = None) -> Path:
    """A GGUF file from its parts, right or wrong. Defaults: arch 'flux', tensors ``a`` (F32, 4
    values) and ``b`` (Q8_0, 2 rows of 32). ``infos``: (name, ne, type id, offset); ``cut``: keep
    only the first bytes."""
    if kvs is None:
        kvs = [kv("general.architecture", 8, string("flux"))]
    if infos is None:
        infos = [("a", [4], 0, 0), ("b", [32, 2], 8, 32)]
    if data is None:
        q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), T.Q8_0)
        data = np.arange(4, dtype=np.float32).tobytes() + bytes(16) + q8.tobytes()
    out = bytearray(magic + struct.pack(endian + "IQQ", version, len(infos), len(kvs)))
    for key, vtype, payload in kvs:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload
    for name, ne, type_id, offset in infos:
        out += string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        out += struct.pack("<IQ", type_id, offset)
    out += bytes(-len(out) % alignment) + data
    out += bytes(-len(out) % alignment)
    path = Path(path)
    path.write_bytes(bytes(out[:cut] if cut is not None else out))
    return path
