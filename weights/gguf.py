"""GGUF files: a strict reader (memory-mapped) and the checkpoint view the transformer loader reads.

Layout (ggml's ``gguf.cpp`` rules, little-endian): ``b"GGUF"``, u32 version (2 or 3), u64 tensor
count, u64 KV count; the KVs (u64-length UTF-8 key, u32 value type, value; arrays are u32 element
type + u64 count + packed elements); the tensor infos (name, u32 n_dims, u64 ``ne[n_dims]`` with
``ne[0]`` the innermost axis, u32 GGML type, u64 offset); zero padding to the alignment
(``general.alignment``, default 32); the data section, each tensor at ``offset`` from its start,
packed in table order with each tensor padded to the alignment.

Diffusion-model GGUFs (ComfyUI-GGUF's ``convert.py`` + its patched ``llama-quantize``) carry the
original single-file names (BFL / Stability, no prefix or ``model.diffusion_model.``), so the
families' key tables and ``weights.detect`` read them as they read a safetensors file. Their
``comfy.gguf.orig_shape.<name>`` KVs (ARRAY of INT32) give a tensor's real shape when it was
stored reshaped. LLM / text-encoder GGUFs and other image models are refused by name.
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ggml import BY_ID, OTHER_IDS, PLAIN, TYPES, GGMLType, dequantize
from .errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 5  # ggml allows 4; ComfyUI-GGUF's fix_5d_tensors.py appends 5-D ones (Wan, HunyuanVideo)
ORIG_SHAPE = "comfy.gguf.orig_shape."
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
              8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
BOOL = 7

# general.architecture of language / text-encoder GGUFs (llama.cpp, ComfyUI-GGUF's text encoders)
LANGUAGE_ARCHS = {"llama", "llama4", "mistral", "mistral3", "qwen", "qwen2", "qwen2vl", "qwen2moe", "qwen3", "qwen3vl",
                  "qwen3moe", "gemma", "gemma2", "gemma3", "t5", "t5encoder", "phi2", "phi3", "gpt2", "gptneox",
                  "falcon", "bert", "mllama", "clip", "deepseek2", "command-r", "olmo", "glm4", "mpt", "starcoder"}
LANGUAGE_TENSORS = ("blk.", "enc.blk.", "dec.blk.", "token_embd.", "output_norm.", "v.blk.")
# ComfyUI-GGUF's other image-model tags: architectures this project does not implement
OTHER_IMAGE_ARCHS = {"sd1": "Stable Diffusion 1.x (a UNet)", "sdxl": "SDXL (a UNet)", "aura": "AuraFlow",
                     "hidream": "HiDream", "cosmos": "Cosmos", "ltxv": "LTX-Video", "hyvid": "HunyuanVideo",
                     "wan": "Wan", "lumina2": "Lumina 2 / Z-Image"}
IMPLEMENTED = "the diffusion transformers of weights/families (SD3 / SD3.5, FLUX.1, ...)"


class GGUFError(CheckpointError):
    """A GGUF file that is malformed, or not one this project reads: one line saying which."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (``ne`` reversed), as stored
    type: GGMLType
    start: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Little-endian reads over a buffer; reading past its end is the 'truncated' error."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path} is truncated: it ends inside {what} (byte {self.pos} of {len(self.buf)}); "
                            "download it again")
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self, what: str) -> str:
        n = self.take("Q", what)
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path} is truncated: {what} claims {n} bytes at byte {self.pos} of a "
                            f"{len(self.buf)}-byte file; download it again")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({raw[:40]!r}); the file is corrupt") from None

    def value(self, vtype: int, key: str):
        if vtype == STRING:
            return self.string(f"the value of {key!r}")
        if vtype == ARRAY:
            etype = self.take("I", f"the array type of {key!r}")
            count = self.take("Q", f"the array length of {key!r}")
            self._known(etype, key)
            if etype == ARRAY:
                raise GGUFError(f"{self.path}: metadata {key!r} is an array of arrays, which GGUF readers (ggml) "
                                "refuse; the file is malformed")
            if etype in SCALARS and self.pos + count * struct.calcsize(SCALARS[etype]) > len(self.buf):
                raise GGUFError(f"{self.path} is truncated: array {key!r} claims {count} values at byte {self.pos}; "
                                "download it again")
            return [self.value(etype, key) for _ in range(count)]
        self._known(vtype, key)
        v = self.take(SCALARS[vtype], f"the value of {key!r}")
        if vtype == BOOL:
            if v not in (0, 1):
                raise GGUFError(f"{self.path}: metadata {key!r} is a BOOL holding {v} (must be 0 or 1); the file is "
                                "corrupt")
            v = bool(v)
        return v

    def _known(self, vtype: int, key: str) -> None:
        if vtype not in TYPE_NAMES:
            raise GGUFError(f"{self.path}: metadata {key!r} has value type {vtype}, not a GGUF type (0-12); the "
                            "file is corrupt or from a newer GGUF version")


class GGUFFile:
    """The header, metadata and tensor table of a GGUF file, checked strictly; tensor data are
    views of a copy-on-write memory map (nothing is read until used)."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 4:
                raise GGUFError(f"{path} is truncated: {size} bytes, less than a GGUF header; download it again")
            if head[:4] != MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
            if size < 24:
                raise GGUFError(f"{path} is truncated: {size} bytes, less than a GGUF header; download it again")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._map, path)
        cur.pos = 4
        self.version = cur.take("I", "the header")
        if self.version not in VERSIONS:
            if self.version and self.version & 0xFFFF == 0:
                raise GGUFError(f"{path} is a big-endian GGUF (written with --bigendian); mmdit reads little-endian "
                                "GGUF files only: convert it again without --bigendian")
            raise GGUFError(f"{path} is a GGUF file of version {self.version}; mmdit reads versions 2 and 3"
                            + (" (v1 files from 2023 must be converted again)" if self.version == 1 else ""))
        n_tensors, n_kv = cur.take("QQ", "the header")
        self.metadata: dict[str, object] = {}
        self.kv_types: dict[str, int] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            if key in self.metadata:
                raise GGUFError(f"{path}: metadata key {key!r} appears twice; the file is malformed")
            vtype = cur.take("I", f"the type of {key!r}")
            self.kv_types[key] = vtype
            self.metadata[key] = cur.value(vtype, key)
        self.alignment = self._alignment()
        infos = [self._info(cur, i) for i in range(n_tensors)]
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        expected = 0
        for name, shape, gtype, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor {name!r} appears twice in the tensor table; the file is malformed")
            nbytes = gtype.nbytes(shape)
            if offset != expected:
                raise GGUFError(f"{path}: tensor {name!r} has data offset {offset}, expected {expected} (tensor "
                                f"data must be packed in table order at {self.alignment}-byte alignment); the file "
                                "is malformed")
            expected += -(-nbytes // self.alignment) * self.alignment
            end = self.data_start + offset + nbytes
            if end > size:
                raise GGUFError(f"{path} is truncated: tensor {name!r} ends at byte {end} but the file has {size} "
                                "bytes; download it again")
            self.tensors[name] = TensorInfo(name, shape, gtype, self.data_start + offset, nbytes)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return ALIGNMENT
        a, vtype = self.metadata["general.alignment"], self.kv_types["general.alignment"]
        if vtype != 4 or a <= 0 or a & (a - 1):
            raise GGUFError(f"{self.path}: general.alignment is {a!r} ({TYPE_NAMES[vtype]}); it must be a UINT32 "
                            "power of two")
        return a

    def _info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.take("I", f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to "
                            f"{MAX_DIMS}")
        ne = [cur.take("Q", f"tensor {name!r}") for _ in range(n_dims)]
        type_id, offset = cur.take("I", f"tensor {name!r}"), cur.take("Q", f"tensor {name!r}")
        gtype = BY_ID.get(type_id)
        if gtype is None:
            what = f"GGML type {OTHER_IDS[type_id]}" if type_id in OTHER_IDS else f"unknown GGML type id {type_id}"
            raise GGUFError(f"{self.path}: tensor {name!r} is stored as {what}, which mmdit does not read; it reads "
                            f"{', '.join(TYPES)}")
        if ne[0] % gtype.block:
            raise GGUFError(f"{self.path}: tensor {name!r} has rows of {ne[0]} values, not a multiple of the "
                            f"{gtype.name} block ({gtype.block}); the file is malformed")
        if any(n >= 2 ** 62 for n in ne):
            raise GGUFError(f"{self.path}: tensor {name!r} has an impossible size {ne}; the file is corrupt")
        return name, tuple(reversed(ne)), gtype, offset

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as stored: typed (F32 / F16 / BF16) in its shape, else uint8 rows of blocks."""
        info = self.tensors[name]
        dtype = PLAIN.get(info.type.name, torch.uint8)
        count = info.nbytes // dtype.itemsize
        if count == 0:  # a tensor with a zero-sized axis
            return torch.empty(info.type.stored_shape(info.shape), dtype=dtype)
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=info.start)
        return t.view(info.type.stored_shape(info.shape))


class GGUFCheckpoint(Mapping):
    """name -> tensor over one GGUF file, with the ``Checkpoint`` interface. Reading a name gives
    its values in fp32 (dequantized); ``stored(name)`` gives the blocks as stored, for layers that
    keep them (``mmdit.ggml.GGUFLinear``)."""

    format = "GGUF"

    def __init__(self, path: str | os.PathLike):
        self.file = GGUFFile(path)
        self.files = [self.file.path]
        self._refuse_foreign()
        self.shapes = {n: i.shape for n, i in self.file.tensors.items()}
        for key, value in self.file.metadata.items():
            if key.startswith(ORIG_SHAPE):
                self._orig_shape(key[len(ORIG_SHAPE):], value, self.file.kv_types[key])

    def _refuse_foreign(self) -> None:
        f, arch = self.file, self.file.architecture
        names = list(f.tensors)
        llm = next((n for n in names if n.startswith(LANGUAGE_TENSORS)), None)
        if arch in LANGUAGE_ARCHS or llm or any(k.startswith("tokenizer.") for k in f.metadata):
            like = f", tensors like {llm!r}" if llm else ""
            raise GGUFError(f"{f.path} is the GGUF of a language / text-encoder model (general.architecture={arch!r}"
                            f"{like}), not a diffusion transformer: pass the transformer's GGUF (e.g. "
                            "flux1-dev-Q8_0.gguf); the text encoders come from the pipeline (--text-from)")
        if arch in OTHER_IMAGE_ARCHS:
            raise GGUFError(f"{f.path} is the GGUF of {OTHER_IMAGE_ARCHS[arch]} (general.architecture={arch!r}), "
                            f"which mmdit does not implement: it runs {IMPLEMENTED}")

    def _orig_shape(self, name: str, value, vtype: int) -> None:
        where = f"{self.file.path}: {ORIG_SHAPE}{name}"
        if name not in self.shapes:
            raise GGUFError(f"{where} names a tensor the file does not hold")
        if vtype != ARRAY or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise GGUFError(f"{where} must be an ARRAY of positive INT32 (ComfyUI-GGUF's convention), got {value!r}")
        info = self.file.tensors[name]
        if _numel(value) != _numel(info.shape):
            raise GGUFError(f"{where} is {tuple(value)}, which does not hold the {_numel(info.shape)} values of "
                            f"the stored {info.shape}")
        self.shapes[name] = tuple(value)

    # ---- the Checkpoint interface --------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        return iter(self.file.tensors)

    def __len__(self) -> int:
        return len(self.file.tensors)

    def __contains__(self, name) -> bool:
        return name in self.file.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> str:
        """The GGML type name: "Q8_0", "BF16", "F32", ..."""
        return self.file.tensors[name].type.name

    def metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.file.metadata.items()}

    def nbytes(self) -> int:
        return os.path.getsize(self.file.path)

    def tensor_bytes(self) -> int:
        """Bytes of tensor data (without header and padding)."""
        return sum(i.nbytes for i in self.file.tensors.values())

    def bytes_per_type(self) -> dict[str, int]:
        """GGML type -> bytes of tensor data in it, largest first."""
        out: dict[str, int] = {}
        for info in self.file.tensors.values():
            out[info.type.name] = out.get(info.type.name, 0) + info.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def describe(self) -> str:
        f = self.file
        file_type = f.metadata.get("general.file_type")
        return (f"GGUF v{f.version}, general.architecture={f.architecture!r}"
                + (f", general.file_type={file_type}" if file_type is not None else "")
                + f", {len(f.tensors)} tensors, {len(f.metadata)} metadata keys")

    def __getitem__(self, name: str) -> torch.Tensor:
        """The values in fp32, in the tensor's real shape."""
        info = self.file.tensors[name]
        return dequantize(self.file.stored(name), info.type.name).reshape(self.shapes[name])

    def stored(self, name: str) -> tuple[str, torch.Tensor] | None:
        """(GGML type name, the tensor as stored), or None when it was stored reshaped."""
        if self.shapes[name] != self.file.tensors[name].shape:
            return None
        return self.dtype(name), self.file.stored(name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file starting with the GGUF magic."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
