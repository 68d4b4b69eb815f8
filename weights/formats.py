"""Checkpoint files as people have them: ComfyUI scaled fp8, renamed norms, and what we refuse.

``Canonical`` is a read-only view of a ``Checkpoint`` that the transformer loader and
``inspect`` use instead of the raw file:

* ComfyUI **scaled fp8**, both forms, is recognised and its scales are applied:
  - ``<layer>.weight`` (float8) + ``<layer>.scale_weight`` (fp32 scalar), a top-level
    ``scaled_fp8`` marker, sometimes ``<layer>.scale_input``;
  - ``<layer>.weight`` + ``<layer>.weight_scale`` + ``<layer>.comfy_quant`` (uint8 bytes of
    a JSON ``{"format": "float8_e4m3fn"}``), sometimes ``<layer>.input_scale``.
  The scale and marker tensors are hidden from the key set; reading ``<layer>.weight``
  gives ``weight.float() * scale`` (in fp32), ``raw()`` gives the stored tensor and scale.
  Input scales only matter to fp8 activation kernels and are not used.
* BFL **fp8r** (FLUX.2): ``<layer>.weight`` float8 + ``<layer>.weight_scale`` fp32 of shape
  ``(out,)``, one scale per row: read as ``weight.float() * scale[:, None]``, before any key-map
  op (qkv split, adaLN swap) sees the tensor.
* FLUX RMSNorm weights saved as ``*_norm.weight`` (current ComfyUI) read as ``*_norm.scale``.
* GGUF files (``weights.gguf``) come through here too; ``stored()`` gives their blocks.
* Formats this project does not load (bitsandbytes NF4/FP4/int8, optimum-quanto,
  int4 SVDQuant/GPTQ, Chroma1-Radiance, a LoRA adapter instead of a model) are one error that names
  them and says what to use instead.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping

import torch

from .checkpoint import Checkpoint, CheckpointError

FORMAT = "scaled fp8 (ComfyUI)"
FORMAT_ROWS = "fp8 with per-row scales (BFL fp8r)"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")  # the comfy_quant formats read here
# leaf suffix -> the weight it scales (None: only marks the layer or scales its input)
_OLD = {".scale_weight": ".weight", ".scale_input": None}
_NEW = {".weight_scale": ".weight", ".input_scale": None, ".comfy_quant": None,
        ".weight_scale_2": None}  # nvfp4's second (per-tensor) scale: refused by its comfy_quant format
_NORM_ALIASES = {".query_norm.weight": ".query_norm.scale", ".key_norm.weight": ".key_norm.scale"}

_USE_INSTEAD = "use the bf16/fp16 safetensors, or a ComfyUI scaled-fp8 file, of the same model"
_CONTROLNET = re.compile(r"(^|\.)(controlnet_\w+|input_hint_block|pos_embed_input)\.")
# (what it is, a test on one key, what to do instead) for formats refused with a clear message
_FOREIGN = [
    ("a bitsandbytes NF4/FP4 quantized checkpoint", lambda k: ".quant_state.bitsandbytes__" in k
     or k.endswith((".weight.absmax", ".weight.quant_map", ".weight.nested_absmax")), _USE_INSTEAD),
    ("a bitsandbytes int8 (LLM.int8) checkpoint", lambda k: k.endswith((".SCB", ".weight_format")), _USE_INSTEAD),
    ("an optimum-quanto quantized checkpoint", lambda k: k.endswith((".weight._data", ".weight._scale")),
     _USE_INSTEAD),
    ("an int4 checkpoint (nunchaku SVDQuant / GPTQ / AWQ: qweight, wscales, qzeros)",
     lambda k: k.endswith((".qweight", ".wscales", ".qzeros")), _USE_INSTEAD),
    ("Chroma1-Radiance (pixel-space Chroma with NeRF blocks, not the latent Chroma loaded here)",
     lambda k: k.startswith("nerf_") or ".nerf_" in k, "use a latent Chroma1 (HD / Base) checkpoint"),
    ("Chroma in x0 mode (flow's __x0__ variant; the released Chroma1 models predict velocity)",
     lambda k: k.endswith("__x0__"), "use a released Chroma1 checkpoint"),
    ("a ControlNet (XLabs / InstantX / diffusers: controlnet_blocks, input hint), not a base transformer",
     lambda k: _CONTROLNET.search(k) is not None,
     "ControlNet models are not supported; point at the base model's transformer (e.g. flux1-dev.safetensors)"),
]
# ComfyUI comfy_quant formats refused here: what to call them
_COMFY_QUANT = {"nvfp4": "nvfp4 (4-bit NVIDIA FP4 weights with fp8 block scales)",
                "mxfp8": "mxfp8 (fp8 weights with per-block scales)",
                "int8_tensorwise": "int8 (8-bit integer weights)", "int8_blockwise": "int8 (8-bit integer weights)"}
LORA_MARKS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora.down.", ".lora.up.", "lora_unet_",
              ".processor.qkv_lora", ".processor.proj_lora")
EMA_MARKS = ("model_ema.", "ema.", "ema_model.")


def refuse_foreign(keys, where: str) -> None:
    """One error naming the format, if ``keys`` are of a checkpoint kind this project can't load."""
    keys = list(keys)
    for what, test, instead in _FOREIGN:
        hits = [k for k in keys if test(k)]
        if hits:
            raise CheckpointError(f"{where} is {what} ({len(hits)} keys such as {hits[0]!r}): that format "
                                  f"is not supported; {instead}")
    lora = [k for k in keys if is_lora_key(k)]
    if lora and len(lora) == len(keys):
        raise CheckpointError(f"{where} is a LoRA adapter ({len(keys)} tensors such as {keys[0]!r}), not a model: "
                              "load the base model and apply it with mmdit.apply_lora(model, path) "
                              "(CLI: --lora PATH[:SCALE])")


def is_lora_key(k: str) -> bool:
    """A key of a LoRA adapter in any of the layouts ``mmdit.lora`` reads."""
    return (any(m in k for m in LORA_MARKS) or k.startswith(("lora_te", "lora_unet", "lora_transformer_", "lycoris_"))
            or k.endswith((".alpha", ".diff", ".diff_b")))


def residue_hints(unexpected: list[str]) -> list[str]:
    """What to do about unexpected keys that are LoRA or EMA residue, for the strict-load error."""
    lines = []
    lora = [k for k in unexpected if is_lora_key(k)]
    if lora:
        lines.append(f"{len(lora)} of its tensors are LoRA tensors ({lora[0]!r}, ...): the file holds an unmerged LoRA "
                     "beside the model; save the base model and the LoRA apart, then use mmdit.apply_lora")
    ema = [k for k in unexpected if k.startswith(EMA_MARKS)]
    if ema:
        lines.append(f"{len(ema)} of its tensors are EMA residue ({ema[0]!r}, ...): a training checkpoint with EMA "
                     "weights beside the model; export the model (or the EMA weights) alone")
    return lines


def _comfy_format(raw: torch.Tensor) -> str:
    try:
        return json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8")).get("format", "?")
    except (ValueError, AttributeError):
        return "?"


class Canonical(Mapping):
    """name -> tensor over a ``Checkpoint``, with scaled fp8 applied and aliases resolved."""

    def __init__(self, ckpt: Checkpoint, where: str):
        self.ckpt, self.where, self.files = ckpt, where, ckpt.files
        keys = list(ckpt)
        refuse_foreign(keys, where)
        present = set(keys)
        self.scales: dict[str, str] = {}  # stored weight key -> its scale key
        hidden = set()
        for k in keys:
            leaf = next((s for s in (*_OLD, *_NEW) if k.endswith(s)), None)
            if k == "scaled_fp8" or k.endswith(".scaled_fp8"):
                hidden.add(k)
            elif leaf is not None:
                hidden.add(k)
                target = {**_OLD, **_NEW}[leaf]
                if target is not None:
                    self.scales[k[:-len(leaf)] + target] = k
        orphans = sorted(s for w, s in self.scales.items() if w not in present)
        if orphans:
            raise CheckpointError(f"{where} has fp8 scales for weights it does not hold: {orphans[:6]}")
        self._check_comfy_quant([k for k in keys if k.endswith(".comfy_quant")])  # before the scales' shapes
        self.row_scaled = {w for w, s in self.scales.items() if self._per_row(w, s)}  # weights with (out,) scales
        wide = [(s, self.ckpt.shape(s)) for w, s in self.scales.items()
                if math.prod(self.ckpt.shape(s)) != 1 and w not in self.row_scaled]
        if wide:
            raise CheckpointError(f"{where}: {wide[0][0]} has shape {wide[0][1]} ({len(wide)} such scales): only "
                                  f"per-tensor (scalar) and per-row (out,) fp8 scales are supported; {_USE_INSTEAD}")
        self.marker = next((k for k in keys if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
        self.hidden = sorted(hidden)
        self.alias = {}  # our name -> stored name
        for k in keys:
            if k in hidden:
                continue
            for old, new in _NORM_ALIASES.items():
                if k.endswith(old):
                    self.alias[k[:-len(old)] + new] = k
        stored = {v for v in self.alias.values()}
        self._keys = [k for k in keys if k not in hidden and k not in stored] + list(self.alias)

    def _per_row(self, weight: str, scale: str) -> bool:
        """A (out,) scale of a 2-D (out, in) weight with more than one row."""
        w, sc = self.ckpt.shape(weight), self.ckpt.shape(scale)
        return len(w) == 2 and w[0] > 1 and tuple(sc) == (w[0],)

    def _check_comfy_quant(self, markers: list[str]) -> None:
        bad = {}
        for k in markers:
            fmt = _comfy_format(self.ckpt[k])
            if fmt not in FP8_FORMATS:
                bad.setdefault(fmt, []).append(k[:-len(".comfy_quant")])
        if bad:
            fmt, layers = next(iter(bad.items()))
            name = _COMFY_QUANT.get(fmt, f"{fmt!r}")
            raise CheckpointError(f"{self.where} is a ComfyUI {name} quantized checkpoint ({len(layers)} layers "
                                  f"such as {layers[0]}): only its float8 per-tensor layers load here; {_USE_INSTEAD}")

    # ---- what the file is --------------------------------------------------------------

    @property
    def format(self) -> str | None:
        """"scaled fp8 (ComfyUI)", "fp8 with per-row scales (BFL fp8r)", the file's own format
        ("GGUF"), or None."""
        if self.row_scaled:
            return FORMAT_ROWS
        return FORMAT if self.scales or self.marker else getattr(self.ckpt, "format", None)

    def per_row(self, name: str) -> bool:
        """Whether ``name`` is stored with one scale per row."""
        return self._stored(name) in self.row_scaled

    @property
    def quantized(self) -> int:
        """Weights stored with a scale."""
        return len(self.scales)

    # ---- Mapping + the Checkpoint interface --------------------------------------------

    def _stored(self, name: str) -> str:
        return self.alias.get(name, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in self.alias or (name in self.ckpt and name not in self.hidden)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(self._stored(name))

    def dtype(self, name: str) -> str:
        return self.ckpt.dtype(self._stored(name))

    def metadata(self) -> dict[str, str]:
        return self.ckpt.metadata()

    def nbytes(self) -> int:
        return self.ckpt.nbytes()

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored tensor and its fp32 scale: None if it has none, 0-d per tensor, (out,) per row."""
        stored = self._stored(name)
        scale = self.scales.get(stored)
        if scale is None:
            return self.ckpt[stored], None
        return self.ckpt[stored], self.ckpt[scale].float().reshape(-1 if stored in self.row_scaled else ())

    def stored(self, name: str) -> tuple[str, torch.Tensor] | None:
        """(type, the tensor as stored) for files that keep quantized blocks (GGUF), else None."""
        get = getattr(self.ckpt, "stored", None)
        return None if get is None else get(self._stored(name))

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor as the model wants it: scaled fp8 dequantized as ``fp8.float() * scale``
        (per row: ``scale[:, None]``)."""
        t, scale = self.raw(name)
        if scale is None:
            return t
        return t.float() * (scale[:, None] if scale.dim() else scale)
