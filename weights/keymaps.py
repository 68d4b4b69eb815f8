"""Key maps between our names (= the original Stability / BFL names) and diffusers names.

The tables are data, one per family (``weights/families/<family>.py``). Each row is
``(ours, diffusers, op)``. ``{}`` stands for a block index; a trailing ``.*`` stands for the parameter leaf (``weight`` or ``bias``), carried over unchanged. When
``diffusers`` is a tuple, our tensor is the concatenation of those tensors along dim 0.

ops (our tensor <- diffusers tensors; every op is exactly invertible):
  copy     same tensor
  qkv      cat(q, k, v): three equal row blocks
  qkv_mlp  cat(q, k, v, mlp): FLUX single-block ``linear1``; q, k, v have ``hidden`` rows each
  gate_up  cat(gate, up): two equal row blocks (Qwen-Image 2.1's fused SwiGLU input)
  adaln    a 2-chunk adaLN (``hidden`` * 2 rows) is (shift, scale) in the original and
           (scale, shift) in diffusers: swap the halves. The 6- and 9-chunk ones are copied.
           (docs/architecture.md, key maps: only SD3 ``final_layer``, SD3 last-block ``context_block`` and
           FLUX ``final_layer`` have 2 chunks.)

Original layout -> ours is the identity once the prefix (``model.diffusion_model.``) is off.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .families import FAMILIES

TABLES = {name: family.TABLE for name, family in FAMILIES.items()}


@dataclass(frozen=True)
class Recipe:
    """How one of our tensors is made from checkpoint tensors: ``op(*[ckpt[k] for k in keys])``."""

    keys: tuple[str, ...]
    op: str


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern[:-2] if pattern.endswith(".*") else pattern).replace(r"\{\}", r"(?P<i>\d+)")
    return re.compile(body + (r"\.(?P<leaf>weight|bias)" if pattern.endswith(".*") else "") + "$")


def _fill(pattern: str, m: re.Match) -> str:
    d = m.groupdict()
    out = pattern.replace("{}", d.get("i") or "")
    return out[:-1] + d["leaf"] if pattern.endswith(".*") else out


def _compile(table):
    """Rows as (our regex, our pattern, diffusers patterns, diffusers regexes, op)."""
    rows = []
    for ours, theirs, op in table:
        parts = (theirs,) if isinstance(theirs, str) else theirs
        assert all(p.endswith(".*") == ours.endswith(".*") for p in parts), f"leaf mismatch in row {ours}"
        rows.append((_regex(ours), ours, parts, [_regex(p) for p in parts], op))
    return rows


_COMPILED = {fam: _compile(table) for fam, table in TABLES.items()}


def _match_ours(key: str, family: str):
    for rx, _, parts, _, op in _COMPILED[family]:
        m = rx.match(key)
        if m:
            return tuple(_fill(p, m) for p in parts), op
    return None


def _match_diffusers(key: str, family: str):
    """(our key, part index, number of parts, op) for a diffusers key, or None."""
    for _, ours, parts, rxs, op in _COMPILED[family]:
        for j, rx in enumerate(rxs):
            m = rx.match(key)
            if m:
                return _fill(ours, m), j, len(parts), op
    return None


def known(key: str, layout: str, family: str) -> bool:
    """Whether ``key`` (no prefix) is a name of ``family``'s transformer in ``layout``."""
    return (_match_ours if layout == "original" else _match_diffusers)(key, family) is not None


# ---- the transforms, both directions -------------------------------------------------------

def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def combine(op: str, parts: list[torch.Tensor], hidden: int) -> torch.Tensor:
    """Our tensor from its diffusers parts."""
    if op == "copy":
        return parts[0]
    if op in ("qkv", "qkv_mlp", "gate_up"):
        return torch.cat(parts, dim=0)
    if op == "adaln":
        return _swap_halves(parts[0]) if parts[0].shape[0] == 2 * hidden else parts[0]
    raise ValueError(f"unknown key-map op {op!r}")


def split(op: str, t: torch.Tensor, hidden: int) -> list[torch.Tensor]:
    """The diffusers parts of one of our tensors (inverse of ``combine``)."""
    if op == "copy":
        return [t]
    if op == "qkv":
        return list(t.chunk(3, dim=0))
    if op == "gate_up":
        return list(t.chunk(2, dim=0))
    if op == "qkv_mlp":
        return list(t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0))
    if op == "adaln":
        return [_swap_halves(t) if t.shape[0] == 2 * hidden else t]
    raise ValueError(f"unknown key-map op {op!r}")


def combined_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape ``combine`` would give, without reading anything."""
    if op in ("qkv", "qkv_mlp", "gate_up"):
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return tuple(shapes[0])


# ---- whole state dicts ---------------------------------------------------------------------

def plan_from_diffusers(keys: Iterable[str], family: str) -> tuple[dict[str, Recipe], list[str], list[str]]:
    """Group diffusers keys into recipes for our keys.

    Returns ``(recipes, unmatched, incomplete)``: diffusers keys that no row knows, and the
    missing diffusers parts of recipes that are only partly present.
    """
    groups: dict[str, list] = {}
    ops: dict[str, str] = {}
    unmatched = []
    for k in keys:
        hit = _match_diffusers(k, family)
        if hit is None:
            unmatched.append(k)
            continue
        ours, j, n, op = hit
        groups.setdefault(ours, [None] * n)[j] = k
        ops[ours] = op
    recipes, incomplete = {}, []
    for ours, parts in groups.items():
        if None in parts:
            expected = _match_ours(ours, family)[0]
            incomplete += [e for e, p in zip(expected, parts) if p is None]
        else:
            recipes[ours] = Recipe(tuple(parts), ops[ours])
    return recipes, unmatched, incomplete


def from_diffusers(sd: Mapping[str, torch.Tensor], family: str, hidden: int) -> dict[str, torch.Tensor]:
    """diffusers state dict -> ours (= original names). Raises on keys it can't place."""
    recipes, unmatched, incomplete = plan_from_diffusers(sd, family)
    if unmatched or incomplete:
        raise KeyError(f"diffusers {family} keys with no place in our layout: {unmatched[:8]}; "
                       f"missing parts: {incomplete[:8]}")
    return {k: combine(r.op, [sd[s] for s in r.keys], hidden) for k, r in recipes.items()}


def to_diffusers(sd: Mapping[str, torch.Tensor], family: str, hidden: int) -> dict[str, torch.Tensor]:
    """Ours (= original names) -> diffusers names and tensors. Works on ``meta`` tensors too."""
    out = {}
    for k, t in sd.items():
        hit = _match_ours(k, family)
        if hit is None:
            raise KeyError(f"{k!r} has no row in the {family} key table")
        names, op = hit
        out.update(zip(names, split(op, t, hidden)))
    return out


def to_original(sd: Mapping[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Ours -> original layout: the same names, with the all-in-one file prefix added."""
    return {prefix + k: t for k, t in sd.items()}


def to_layout(sd: Mapping[str, torch.Tensor], layout: str, family: str, hidden: int,
              prefix: str = "") -> dict[str, torch.Tensor]:
    """Ours -> ``layout`` ("original" or "diffusers"), with ``prefix`` before every key."""
    if layout == "original":
        return to_original(sd, prefix)
    if layout == "diffusers":
        return {prefix + k: t for k, t in to_diffusers(sd, family, hidden).items()}
    raise ValueError(f"unknown layout {layout!r}; expected 'original' or 'diffusers'")


def recipes_for(keys: Iterable[str], layout: str, family: str, prefix: str = "") -> dict[str, Recipe]:
    """Our key -> recipe over the checkpoint's own (prefixed) keys. Keys it can't place are skipped
    (the caller checks the key set first, see ``weights.transformer``)."""
    keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    if layout == "original":
        return {k: Recipe((prefix + k,), "copy") for k in keys}
    recipes, _, _ = plan_from_diffusers(keys, family)
    return {k: Recipe(tuple(prefix + s for s in r.keys), r.op) for k, r in recipes.items()}


def materialize(recipe: Recipe, read: Callable[[str], torch.Tensor], hidden: int) -> torch.Tensor:
    """Read the recipe's checkpoint tensors and combine them into our tensor."""
    return combine(recipe.op, [read(k) for k in recipe.keys], hidden)
