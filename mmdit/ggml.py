"""GGML tensor types (what GGUF files store), in torch: the block layouts, dequantize, quantize.

A quantized tensor is stored row by row along its last axis (a Linear weight's ``in_features``):
each row is ``in / block`` consecutive blocks of ``size`` bytes, so whole rows can be cut and
joined as bytes. ``dequantize`` follows gguf-py's numpy reference (``gguf.quants``) operation for
operation in fp32, so it equals it bit for bit; ``quantize`` (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16,
F16, F32) equals ``gguf.quants.quantize`` bit for bit. Everything is vectorised over blocks, runs on
any device, and traces as one graph (no tensor values decide a Python branch).

Fields ``d``, ``m``, ``dmin`` are little-endian fp16; ``v`` below is an element's index in its block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # the GGML type id stored in a GGUF tensor info
    block: int  # elements per block
    size: int  # bytes per block

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = 1
        for s in shape:
            n *= s
        return n // self.block * self.size

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the stored tensor: typed for F32 / F16 / BF16, else uint8 rows of blocks."""
        if self.name in PLAIN:
            return tuple(shape)
        return (*shape[:-1], shape[-1] // self.block * self.size)


QK_K = 256
TYPES = {t.name: t for t in [
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, QK_K, 84), GGMLType("Q3_K", 11, QK_K, 110), GGMLType("Q4_K", 12, QK_K, 144),
    GGMLType("Q5_K", 13, QK_K, 176), GGMLType("Q6_K", 14, QK_K, 210),
    GGMLType("IQ4_NL", 20, 32, 18), GGMLType("IQ4_XS", 23, QK_K, 136),
]}
BY_ID = {t.id: t for t in TYPES.values()}
# GGML types that exist but are not read here (activation types, lattice codebooks, ints, ternary, fp4)
OTHER_IDS = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S",
             22: "IQ2_S", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0",
             35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0"}
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored as typed tensors
QUANTIZE = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what ``quantize`` writes
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL / IQ4_XS
_KPACK = [sum((k + 128) << (8 * j) for j, k in enumerate(KVALUES[i:i + 6])) for i in (0, 6, 12)]


# ---- reading fields out of blocks (n, size) uint8 ------------------------------------------

def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at bytes ``at, at+1`` of each block, as fp32 (n, 1). Every block size and fp16
    offset is even, so the blocks reinterpret as fp16 pairs in place."""
    return b.view(torch.float16)[:, at // 2:at // 2 + 1].float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): low nibbles, then high nibbles."""
    return torch.stack([q & 15, q >> 4], dim=-2)


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 4, k): bits 0-1, 2-3, 4-5, 6-7."""
    return torch.stack([(q >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)


def _bits(q: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 8, k): bit 0 .. bit 7."""
    return torch.stack([(q >> s) & 1 for s in range(8)], dim=-2)


def _kvalues(q: torch.Tensor) -> torch.Tensor:
    """KVALUES[q] as fp32. The table is built on q's device from Python ints (KVALUES + 128, a
    byte each, packed 6 to an int): no tensor is copied from the host per call."""
    i = torch.arange(16, device=q.device)
    packed = torch.where(i < 6, _KPACK[0] >> (8 * i), torch.where(i < 12, _KPACK[1] >> (8 * (i - 6)),
                                                                  _KPACK[2] >> (8 * (i - 12))))
    return ((packed & 255) - 128).float()[q.long()]


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (n, 8). Bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


# ---- dequantize: blocks (n, size) uint8 -> (n, block) fp32 ---------------------------------

def _q8_0(b):  # d @0, int8 q[32] @2:  x = q * d (int8 * fp32 is computed in fp32)
    return b[:, 2:34].view(torch.int8) * _f16(b, 0)


def _q4_0(b):  # d @0, nibbles @2 (byte j: v = j low, v = j + 16 high):  x = d * (q - 8)
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).reshape(-1, 32).view(torch.int8) - 8)


def _q4_1(b):  # d @0, m @2, nibbles @4:  x = d * q + m
    return _f16(b, 0) * _nibbles(b[:, 4:20]).reshape(-1, 32) + _f16(b, 2)


def _q5(b, at):
    """Q5_0 / Q5_1 5-bit values: the high bit of v is bit v of the u32 ``qh`` at ``at`` (even)."""
    h = b.view(torch.int16)
    qh = (h[:, at // 2].to(torch.int32) & 0xFFFF) | (h[:, at // 2 + 1].to(torch.int32) << 16)  # its bits
    shifts = torch.arange(32, dtype=torch.int32, device=b.device)  # made on the device: no host copy
    high = ((qh[:, None] >> shifts) & 1).to(torch.uint8) << 4
    return _nibbles(b[:, at + 4:at + 20]).reshape(-1, 32) | high


def _q5_0(b):  # d @0, qh @2, nibbles @6:  x = d * (q - 16)
    return _f16(b, 0) * (_q5(b, 2).view(torch.int8) - 16)


def _q5_1(b):  # d @0, m @2, qh @4, nibbles @8:  x = d * q + m
    return _f16(b, 0) * _q5(b, 4) + _f16(b, 2)


def _q2_k(b):  # scales[16] @0 (low nibble scale, high min), q 2-bit [64] @16, d @80, dmin @82
    n = b.shape[0]
    scales = b[:, 0:16]
    dl = (_f16(b, 80) * (scales & 15).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80].reshape(n, 2, 32)).reshape(n, 16, 16).float()  # v = 128 h + 32 s + l
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):  # hmask[32] @0, q 2-bit [64] @32, 16 six-bit signed scales [12] @96, d @108
    n = b.shape[0]
    low = _nibbles(b[:, 96:104]).reshape(n, 16)  # scale j: low 4 bits in byte j % 8 ...
    high = _crumbs(b[:, 104:108]).reshape(n, 16)  # ... high 2 bits in byte 8 + j % 4
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _crumbs(b[:, 32:96].reshape(n, 2, 32)).reshape(n, 16, 16)
    hbit = _bits(b[:, 0:32]).reshape(n, 16, 16) ^ 1  # bit v // 32 of hmask[v % 32]; set means no offset
    q = (ql.to(torch.int8) - (hbit << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b):  # d @0, dmin @2, scales/mins [12] @4, nibbles [128] @16
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):  # d @0, dmin @2, scales/mins [12] @4, qh [32] @16, nibbles [128] @48
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(b[:, 16:48]).reshape(n, 8, 32)
    return (d * (low | (high << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b):  # low nibbles [128] @0, high 2 bits [64] @128, int8 scales [16] @192, d @208
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _crumbs(b[:, 128:192].reshape(n, 2, 32)).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


def _iq4_nl(b):  # d @0, nibbles @2 indexing KVALUES:  x = d * K[q]
    return _f16(b, 0) * _kvalues(_nibbles(b[:, 2:18]).reshape(-1, 32))


def _iq4_xs(b):  # d @0, scales_h u16 @2, scales_l [4] @4, nibbles [128] @8; 8 sub-blocks of 32
    n = b.shape[0]
    low = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(n, 8)  # sub-block j: nibble j % 2 of byte j // 2
    h = b.view(torch.int16)[:, 1].to(torch.int32) & 0xFFFF
    high = torch.stack([(h >> (2 * j)) & 3 for j in range(8)], dim=1).to(torch.uint8)
    dl = (_f16(b, 0) * ((low | (high << 4)).to(torch.int8) - 32).float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl * _kvalues(q)).reshape(n, QK_K)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
            "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def dequantize(stored: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a stored tensor (``GGMLType.stored_shape``), computed in fp32, cast to ``dtype``.
    F32 / F16 / BF16 are typed tensors already: only the cast."""
    if qtype in PLAIN:
        return stored.to(dtype)
    t = TYPES[qtype]
    rows = stored.shape[:-1]
    out = _DEQUANT[qtype](stored.reshape(-1, t.size))  # (n_blocks, block) fp32
    return out.reshape(*rows, stored.shape[-1] // t.size * t.block).to(dtype)


# ---- quantize (gguf-py's reference quantizers, bit for bit) --------------------------------

def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, computed as ggml / gguf-py do (``np_roundf``)."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n, 1) fp32 -> (n, 2) bytes of its fp16, little-endian."""
    h = x.half().view(torch.int16).to(torch.int32)
    return torch.cat([h & 255, (h >> 8) & 255], dim=1).to(torch.uint8)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude of each block, with its sign (the first on ties)."""
    return x.gather(1, x.abs().argmax(dim=1, keepdim=True))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 values -> 4 bytes, value v at bit v % 8 of byte v // 8."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8)
    return sum(bits[:, :, i] << i for i in range(8)).to(torch.uint8)


def _quant_q8_0(x):
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), q], dim=1)


def _quant_q4_0(x):
    d = _signed_max(x) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), _pack_nibbles(q)], dim=1)


def _quant_q4_1(x):
    top, low = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (top - low) / 15
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(low), _pack_nibbles(q)], dim=1)


def _quant_q5_0(x):
    d = _signed_max(x) / -16
    q = torch.trunc(x * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_half_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], dim=1)


def _quant_q5_1(x):
    top, low = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    d = (top - low) / 31
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_half_bytes(d), _half_bytes(low), _pack_high_bits(q), _pack_nibbles(q)], dim=1)


def _to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even, NaNs made quiet (ggml's ``ggml_compute_fp32_to_bf16``)."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    n = ((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF
    return (n - ((n >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


_QUANT = {"Q8_0": _quant_q8_0, "Q4_0": _quant_q4_0, "Q4_1": _quant_q4_1, "Q5_0": _quant_q5_0, "Q5_1": _quant_q5_1}


def quantize(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x`` (any float dtype, last axis a multiple of the block) -> the stored tensor of ``qtype``:
    fp32 / fp16 / bf16 for the plain types, uint8 ``(*x.shape[:-1], bytes per row)`` for the others."""
    if qtype not in QUANTIZE:
        raise ValueError(f"quantizing to {qtype} is not supported; choose one of {', '.join(QUANTIZE)}")
    x = x.float()
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.half()
    if qtype == "BF16":
        return _to_bf16(x)
    t = TYPES[qtype]
    if x.dim() == 0 or x.shape[-1] % t.block:
        raise ValueError(f"{qtype} needs rows that are a multiple of {t.block} values; got shape {tuple(x.shape)}")
    out = _QUANT[qtype](x.reshape(-1, t.block))
    return out.reshape(t.stored_shape(tuple(x.shape)))


# ---- the layer -----------------------------------------------------------------------------

class GGUFLinear(nn.Module):
    """A Linear whose weight stays as a GGUF file stores it (``qtype``: quantized blocks as uint8
    rows, or bf16 / fp16), dequantized per forward in x's dtype; the full-precision weight exists
    only inside one layer's call. ``weight`` is a buffer (not trainable, never cast by ``.to(dtype)``
    when quantized); the bias is an ordinary parameter in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, qtype: str, device=None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        t = TYPES[qtype]
        if in_features % t.block:
            raise ValueError(f"{qtype} stores rows in blocks of {t.block}; in_features={in_features} is not a multiple")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("weight", torch.empty(t.stored_shape((out_features, in_features)),
                                                   dtype=PLAIN.get(qtype, torch.uint8), device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in ``dtype``."""
        return dequantize(self.weight, self.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # only attributes and module functions: LoRALinear runs this forward on itself
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.qtype, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"qtype={self.qtype}"
