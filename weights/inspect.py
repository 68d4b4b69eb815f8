"""``describe``: what a checkpoint is, from its header alone (no model is built, no tensor read).
For a GGUF: its version and architecture tag, and the bytes held in each GGML type."""
from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter

import torch

from ..models import transformer_for
from .detect import detect
from .families import FAMILIES
from .formats import FORMAT, FORMAT_ROWS, Canonical
from .hub import resolve

# safetensors dtype tags -> torch names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
           "U8": "uint8", "BOOL": "bool"}
_BUFFERS = ("pos_embed", "pos_embed.pos_embed")  # stored tables (original, diffusers names), not learned


def describe(source: str | os.PathLike, *, revision: str | None = None, token=None, config=None) -> str:
    """A few lines: source, files and size, layout, family, matched preset, config, format, dtypes,
    counts. Raises the error ``load_transformer`` would (every key and shape is checked on a
    model built on ``meta``), so ``mmdit inspect`` fails on a file that would not load.
    ``config``: as ``load_transformer``'s (a full config, or a dict of overrides)."""
    from .transformer import check_keys

    src = resolve(source, revision=revision, token=token)
    ckpt = Canonical(src.open(), str(src.path))
    det = detect(ckpt, src.config_json, config, where=str(src.path))
    with torch.device("meta"):
        check_keys(transformer_for(det.config), ckpt, det, where=str(src.path))
    n_params = n_buffers = 0
    dtypes: Counter = Counter()
    for k in det.keys:
        n = math.prod(ckpt.shape(k))
        if k[len(det.prefix):] in _BUFFERS:
            n_buffers += n
        else:
            n_params += n
        gguf = ckpt.format == "GGUF"  # its GGML type names as they are: F32, BF16, Q8_0, ...
        dtypes[ckpt.dtype(k) if gguf else _DTYPES.get(ckpt.dtype(k), ckpt.dtype(k))] += 1
    size = ckpt.nbytes()
    cfg = det.config
    fields = " ".join(f"{f.name}={_short(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg) if f.init)
    rows = [
        ("source", str(source) + (f" -> {src.path}" if str(src.path) != str(source) else "")),
        ("files", f"{len(ckpt.files)} file{'s' * (len(ckpt.files) != 1)}, {_bytes(size)}"),
        ("layout", det.layout + (f" (prefix {det.prefix!r})" if det.prefix else "")),
        ("family", FAMILIES[det.family].NAME),
        ("preset", det.preset or "none (custom config)"),
        ("config", f"from {det.config_source}: hidden={cfg.hidden_size} {fields}"),
        ("format", ckpt.ckpt.describe() if ckpt.format == "GGUF" else _format(ckpt, det.keys)),
        ("dtype", ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common())),
        *([("bytes", ", ".join(f"{t} {_bytes(n)}" for t, n in ckpt.ckpt.bytes_per_type().items()))]
          if ckpt.format == "GGUF" else []),
        ("parameters", f"{n_params:,}" + (f" (+ {n_buffers:,} in the stored pos_embed table)" if n_buffers else "")),
        ("tensors", str(len(det.keys))),
    ]
    if det.ignored:
        rows.append(("also in file", ", ".join(f"{p.rstrip('.')} ({n} tensors)" for p, n in det.ignored.items())))
    return "\n".join(f"{name + ':':<13} {value}" for name, value in rows)


def _format(ckpt: Canonical, keys) -> str:
    """How the transformer's own weights are stored (fp8 scales of a bundled T5 or CLIP don't count)."""
    own = set(keys)
    scaled = [w for w in ckpt.scales if w in own]
    if not scaled:
        return "plain tensors"
    rows = sum(1 for w in scaled if w in ckpt.row_scaled)
    fmt = FORMAT_ROWS if rows else FORMAT
    scaling = "per-tensor" if not rows else "per-row" if rows == len(scaled) else "per-tensor or per-row"
    return f"{fmt}: {len(scaled)} weights stored as fp8 with a {scaling} scale"


def _short(v):
    if isinstance(v, tuple) and len(v) > 4 and v == tuple(range(v[0], v[0] + len(v))):
        return f"({v[0]}..{v[-1]})"
    return v


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
