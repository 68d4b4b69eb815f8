"""Perturbed branches of a step's rows, inside one batched model call (DG, SLG, PAG).

A step's rows are ``[uncond | cond | branch_1 | branch_2 ...]``. A branch is a copy of some
input rows (``source``, a slice) that differs from one block on:

    MADisruption       DG: the MA channels times rho at the OUTPUT of block m (``model.ma``)
    SkipLayers         SLG: the listed blocks are skipped (output = input) for the branch rows
    IdentityAttention  PAG: in the listed blocks, an image token attends to no other image
                       token, only to itself and to the text (the "value path")

Give them to a model as ``model(..., branches=(Branch(slice(1, 2), SkipLayers((7, 8, 9))),))``;
the perturbed copies come back after the input rows, in the order given. Where each branch's
rows are born and which blocks run them is ``mmdit.models.rows``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MADisruption:
    """Detail Guidance's degraded branch: the model's MA spec (``model.ma``) at its block."""


@dataclass(frozen=True)
class SkipLayers:
    """Skip Layer Guidance: these blocks (global indices) are skipped for the branch rows."""

    layers: tuple[int, ...]


@dataclass(frozen=True)
class IdentityAttention:
    """Perturbed Attention Guidance: in these blocks the image-to-image attention of the branch
    rows is the identity (each image token sees itself and the text tokens)."""

    layers: tuple[int, ...]


@dataclass(frozen=True)
class Branch:
    """Copies of the input rows ``source`` (a slice), perturbed by ``perturbation``; they come
    back after the input rows, in the order the branches are given."""

    source: slice
    perturbation: MADisruption | SkipLayers | IdentityAttention
