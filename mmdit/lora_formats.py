"""What a LoRA file is beyond its keys' layout: PEFT folders and their ``adapter_config.json``,
the adapters refused by name, which model a LoRA was trained for, and its errors in three lines.

``mmdit.lora`` reads the keys; this module answers the questions around them:

* a PEFT ``save_pretrained`` folder holds ``adapter_model.safetensors`` (``base_model.model.``
  keys, no alpha) and ``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``): ``peft_config`` finds the config for a folder or a file
  beside it;
* LyCORIS LoHa / LoKr layers become full weight differences (``lycoris_delta``); DoRA and Tucker
  factors are named by ``refused`` with the step to take instead;
* ``family_guess`` says which model a LoRA's layer names belong to (a FLUX LoRA on SD3);
* ``Problems`` gathers what does not fit and says it in at most three lines, the first one
  complete on its own.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from .weights.checkpoint import CheckpointError
from .weights.families import FAMILIES

PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
# underscored module names: kohya sd-scripts, LyCORIS (SimpleTuner), OneTrainer
UNDERSCORED = ("lora_unet_", "lycoris_", "lora_transformer_")
# text encoders (kohya lora_te*, diffusers, ComfyUI's LoraSave) and OneTrainer's bundled embeddings
TEXT = ("lora_te", "text_encoder", "text_encoders.", "bundle_emb.")
SHOWN = 3  # keys named in an error line

_MERGE = ("merge it into the model with the tool that trained it (LyCORIS, ComfyUI's ModelMergeSave) and load "
          "that file, or apply it in ComfyUI")
# (test on one key, what it is, what to do instead)
_REFUSED = [
    (lambda k: k.endswith((".hada_t1", ".hada_t2")), "a LoHa (LyCORIS) adapter with Tucker tensors", _MERGE),
    (lambda k: k.endswith((".lokr_t1", ".lokr_t2")), "a LoKr (LyCORIS) adapter with a Tucker tensor", _MERGE),
    (lambda k: k.endswith((".dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")),
     "a DoRA adapter (LoRA with weight decomposition)", _MERGE),
    (lambda k: ".lora_mid." in k, "a LoCon with a mid (Tucker) tensor", _MERGE),
]


def refused(keys, where: str) -> None:
    """One error naming the adapter kind, if ``keys`` are of one this project does not apply."""
    for test, what, instead in _REFUSED:
        hits = [k for k in keys if test(k)]
        if hits:
            raise CheckpointError(f"LoRA {where} is {what}, which is not applied here ({len(hits)} tensors such as "
                                  f"{hits[0]!r}): {instead}")


# LyCORIS LoHa / LoKr tensors (lycoris/modules/loha.py, lokr.py): applied as full weight differences
LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
           "lokr_w2_a", "lokr_w2_b")


def lycoris_delta(parts: dict) -> torch.Tensor | str:
    """The full weight difference of a LoHa or LoKr layer at strength 1, or why it can't be made.
    LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank. LoKr: kron(w1, w2), each factor whole or a
    product of two, times alpha / rank when one of them is a product (else 1, as LyCORIS saves it)."""
    t = {k: v.float() for k, v in parts.items()}
    alpha = float(t["alpha"].reshape(-1)[0]) if "alpha" in t else None
    if "hada_w1_a" in t:
        if not {"hada_w1_b", "hada_w2_a", "hada_w2_b"} <= t.keys():
            return f"a LoHa layer with only {sorted(k for k in t if k.startswith('hada_'))}"
        rank = t["hada_w1_b"].shape[0]
        delta = (t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)) * (t["hada_w2_a"] @ t["hada_w2_b"].flatten(1))
        return delta * (alpha / rank if alpha is not None else 1.0)
    w1 = t.get("lokr_w1", t["lokr_w1_a"] @ t["lokr_w1_b"] if {"lokr_w1_a", "lokr_w1_b"} <= t.keys() else None)
    w2 = t.get("lokr_w2", t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1) if {"lokr_w2_a", "lokr_w2_b"} <= t.keys()
               else None)
    if w1 is None or w2 is None:
        return f"a LoKr layer with only {sorted(k for k in t if k.startswith('lokr_'))}"
    rank = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    return torch.kron(w1, w2.flatten(1)) * (alpha / rank if alpha is not None and rank is not None else 1.0)


# ---- PEFT folders --------------------------------------------------------------------------

def peft_file(path: Path) -> Path:
    """The adapter file of a LoRA folder: PEFT's ``adapter_model.safetensors``, diffusers'
    ``pytorch_lora_weights.safetensors``, or its only ``.safetensors``; else one clear error."""
    files = sorted(path.glob("*.safetensors"))
    named = [path / n for n in (PEFT_FILE, "pytorch_lora_weights.safetensors") if (path / n).is_file()]
    if named or len(files) == 1:
        return (named or files)[0]
    found = sorted(p.name for p in path.iterdir())[:6]
    raise CheckpointError(f"LoRA folder {path} has no {PEFT_FILE} (nor one .safetensors file): pass the LoRA file "
                          f"itself, or a PEFT save_pretrained folder (found {found})")


def peft_config(file: Path) -> dict | None:
    """The ``adapter_config.json`` beside ``file`` (PEFT's alpha, ranks, rsLoRA), or None."""
    cfg = file.parent / PEFT_CONFIG
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg} is not valid JSON ({e}); fix or remove it") from None
    if data.get("use_dora"):
        raise CheckpointError(f"LoRA {file} is a DoRA adapter ({cfg} says use_dora), which is not applied here: "
                              f"{_MERGE}")
    return data


def scale_of(module_key: str, rank: int, meta: dict) -> float:
    """alpha / rank (rsLoRA: alpha / sqrt(rank)) for one layer from PEFT / diffusers settings, whose
    keys may carry diffusers' ``transformer.`` prefix; patterns match the end of the module name."""
    cfg = {k.removeprefix("transformer."): v for k, v in meta.items()}
    name = strip(module_key)
    def pick(patterns, default):
        return next((v for p, v in (patterns or {}).items() if re.fullmatch(rf"(.*\.)?({p})", name)), default)
    r = pick(cfg.get("rank_pattern"), cfg.get("r", rank))
    alpha = pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def strip(key: str) -> str:
    """A module key without the file-wide prefixes (``transformer.``, ``diffusion_model.`` ...)."""
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


# ---- which model a LoRA is for -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _module_patterns(family: str) -> re.Pattern:
    """Every module name of ``family`` (ours and diffusers', dotted and underscored) as one regex."""
    names = set()
    for ours, theirs, _ in FAMILIES[family].TABLE:
        for p in (ours, *((theirs,) if isinstance(theirs, str) else theirs)):
            module = p[:-2] if p.endswith(".*") else p.rpartition(".")[0] or p
            for form in (module, module.replace(".", "_")):
                names.add(re.escape(form).replace(r"\{\}", r"\d+"))
    return re.compile("|".join(sorted(names)))


def _names(key: str) -> str:
    key = strip(key)
    return next((key[len(p):] for p in UNDERSCORED if key.startswith(p)), key)


def family_guess(module_keys: list[str]) -> tuple[list[str], int]:
    """(the families whose layer names cover most of ``module_keys``, how many they cover)."""
    counts = {fam: sum(1 for k in module_keys if _module_patterns(fam).fullmatch(_names(k)))
              for fam in FAMILIES}
    best = max(counts.values(), default=0)
    return [f for f, n in counts.items() if n == best and best], best


def _family_names(families: list[str]) -> str:
    return " / ".join(dict.fromkeys(FAMILIES[f].NAME.split(" (")[0] for f in families))


# ---- errors in three lines -----------------------------------------------------------------

def shown(keys: list[str], n: int = SHOWN) -> str:
    """The first ``n`` keys, and how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class Problems:
    """What in a LoRA file does not fit a model, said in at most three lines."""

    def __init__(self, where: str, family: str, keys: list[str]):
        self.where, self.family, self.keys, self.layers = where, family, keys, len(keys)
        self.unmatched: list[str] = []  # module keys that name no layer of the model
        self.misfit: dict[str, str] = {}  # module key -> why its shapes don't fit
        self.half: list[str] = []  # module keys with only a down or an up

    def __bool__(self) -> bool:
        return bool(self.unmatched or self.misfit or self.half)

    def raise_(self) -> None:
        ours = _family_names([self.family])
        lines = []
        if self.unmatched:
            fams, covered = family_guess(self.keys)
            n = len(self.unmatched)
            if fams and self.family not in fams:
                lines.append(f"it is a LoRA for {_family_names(fams)}, not for this {ours} model ({covered} of its "
                             f"{self.layers} layers have {_family_names(fams)} names): apply it to the "
                             f"{_family_names(fams)} model it was made for")
            else:
                lines.append(f"{n} of its {self.layers} layers match no layer of this {ours} model (a LoRA for another "
                             "model, or a layout not supported): check the file is for this model")
            lines.append(f"layers with no match: {shown(self.unmatched)}")
        if self.misfit:
            n = len(self.misfit)
            key, why = next(iter(sorted(self.misfit.items())))
            detail = f"{n} layer(s) don't fit, e.g. {key}: {why}" + (
                f"; also {shown(sorted(self.misfit)[1:])}" if n > 1 else "")
            if lines:
                lines.append(detail)
            elif n == 1:
                lines.append(f"{key}: {why}: the file is damaged or for another model")
            else:
                lines += [f"{n} of its {self.layers} layers have shapes this {ours} model's layers don't have (a LoRA "
                          "for another size or variant of the model): apply it to the model it was trained for", detail]
        if self.half:
            what = (f"{len(self.half)} layer(s) have only half a LoRA pair (a LoRA needs both down (A) and up (B)): "
                    f"{shown(self.half)}")
            lines.append(what if lines else what + "; the file is incomplete")
        head, *details = lines
        raise CheckpointError("\n  ".join([f"LoRA {self.where} can't be applied (nothing was changed): {head}",
                                           *details][:3]))
