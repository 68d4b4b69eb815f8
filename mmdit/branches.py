"""Perturbed branches of a step's rows, inside one batched model call (DG, SLG, PAG).

A step's rows are ``[uncond | cond | branch_1 | branch_2 ...]``. A branch is a copy of some
input rows (``source``, a slice) that differs from one block on:

    MADisruption       DG: the MA channels times rho at the OUTPUT of block m (``model.ma``)
    SkipLayers         SLG: the listed blocks are skipped (output = input) for the branch rows
    IdentityAttention  PAG: in the listed blocks, an image token attends to no other image
                       token, only to itself and to the text (the "value path")

Before its first perturbed block a branch equals its source rows, so it is not computed:
its rows are born there as copies (DG in the very launch that finishes block m, the others
at the input of their first listed block). ``Rows`` keeps, per forward call and in Python
only, where every branch's rows are; every shape follows from counts, so the forward stays
one graph with no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


class Rows:
    """The row layout of one forward call: the B input rows first, then each branch as it is
    born. Blocks ask it what to do (``enter`` before a block, ``run`` around it), and
    ``finish`` puts the output rows in the caller's order."""

    def __init__(self, batch: int, total_blocks: int, branches=(), disruption=None, make_fork=None,
                 ma_block: int = -1):
        """``disruption``: in-place MA rows (a slice) for ``disrupt=``; ``make_fork(source, append)``
        builds the Fork of an MA branch or of the disruption, which act at block ``ma_block``."""
        self.batch, self.make_fork, self.ma_block = batch, make_fork, ma_block
        self.layout = [(None, batch)]  # (branch index or None for the input rows, rows)
        self.branches, self.first = [], []
        for j, br in enumerate(branches):
            start, stop, step = br.source.indices(batch)
            if step != 1 or stop <= start:
                raise ValueError(f"branch {j}: source must be a non-empty slice of the {batch} rows, got {br.source}")
            p = br.perturbation
            self.branches.append(Branch(slice(start, stop), p))  # bounds resolved: stop - start rows
            if isinstance(p, MADisruption):
                self.first.append(None)  # born at the output of the MA block (make_fork knows it)
                continue
            if not p.layers or any(not 0 <= i < total_blocks for i in p.layers):
                raise ValueError(f"branch {j}: layers {p.layers} must be block indices in 0..{total_blocks - 1}")
            self.first.append(min(p.layers))
        if sum(isinstance(b.perturbation, MADisruption) for b in self.branches) + (disruption is not None) > 1:
            raise ValueError("one MA disruption per call: a DG branch (fork) or disrupt, not several")
        self.disruption = disruption
        self.ma_branch = next((j for j, b in enumerate(self.branches) if isinstance(b.perturbation, MADisruption)),
                              None)

    def _segments(self):
        start = 0
        for j, n in self.layout:
            yield j, start, start + n
            start += n

    def enter(self, i: int, tensors: list) -> list:
        """Append the copies of the branches born at the input of block ``i`` to every tensor."""
        for j, first in enumerate(self.first):
            if first == i:
                src = self.branches[j].source
                tensors = [None if t is None else torch.cat([t, t[src]]) for t in tensors]
                self.layout.append((j, src.stop - src.start))
        return tensors

    def fork_at(self, i: int):
        """The Fork acting at the output of block ``i``, or None."""
        if i != self.ma_block:
            return None
        if self.disruption is not None:
            return self.make_fork(self.disruption, False)
        if self.ma_branch is not None:
            return self.make_fork(self.branches[self.ma_branch].source, True)
        return None

    def run(self, i: int, streams: list, vec: torch.Tensor, fork, block_fn) -> tuple[list, torch.Tensor]:
        """``block_fn(*streams, vec, fork, identity) -> streams`` on the rows that run block ``i``;
        skipped rows keep their input. Returns the streams and the conditioning vector ``vec``,
        with the rows of a branch the fork gives birth to appended."""
        skip = {j for j, br in enumerate(self.branches)
                if isinstance(br.perturbation, SkipLayers) and i in br.perturbation.layers}
        keep = [(j, a, b) for j, a, b in self._segments() if j not in skip]
        identity, row = [], 0
        for j, a, b in keep:  # PAG rows, counted among the rows that run
            if j is not None and isinstance(self.branches[j].perturbation, IdentityAttention) \
                    and i in self.branches[j].perturbation.layers:
                identity.append((row, row + b - a))
            row += b - a
        if len(keep) == len(self.layout):
            out = list(block_fn(*streams, vec, fork, tuple(identity)))
        else:
            pick = [(a, b) for _, a, b in keep]
            sub = block_fn(*[_gather(t, pick) for t in streams], _gather(vec, pick), fork, tuple(identity))
            out = [None if o is None else self._merge(o, t, skip, row) for o, t in zip(sub, streams)]
        if fork is not None and fork.append:
            vec = fork.extend(vec)
            self.layout.append((self.ma_branch, fork.rows))
        return out, vec

    def _merge(self, ran: torch.Tensor, before: torch.Tensor, skip: set, n_ran: int) -> torch.Tensor:
        """The rows in layout order again: those that ran from ``ran``, skipped ones from
        ``before``; then whatever the block appended after its ``n_ran`` rows (a fork)."""
        pieces, row = [], 0
        for j, a, b in self._segments():
            if j in skip:
                pieces.append(before[a:b])
            else:
                pieces.append(ran[row:row + b - a])
                row += b - a
        return torch.cat(pieces + [ran[n_ran:]])

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The output rows as the caller expects them: the inputs, then the branches in order."""
        where = {j: (a, b) for j, a, b in self._segments()}
        if all(j == k for k, (j, _) in zip([None, *range(len(self.branches))], self.layout)):
            return out  # born in the order given
        return torch.cat([out[slice(*where[j])] for j in [None, *range(len(self.branches))]])


def _gather(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return t[ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat([t[a:b] for a, b in ranges])
