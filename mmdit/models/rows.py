"""Which rows of a forward call each block runs, and what it does to them (DG's fork, SLG, PAG).

A call's rows are ``[input rows (B) | branch_1 | branch_2 ...]`` (``mmdit.branches``). Before
its first perturbed block a branch equals its source rows, so it is not computed: its rows are
born there as copies (DG in the very launch that finishes block m, the others at the input
of their first listed block). ``RowPlan`` keeps, per call and in Python only, where every
branch's rows are; the model's block loop asks it to run each block (``RowPlan.run``), and a
block sees only a ``BlockRows``: its attention (PAG rows) and its last residual (the fork).
Every shape follows from counts, so the forward stays one graph with no host sync.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..branches import Branch, IdentityAttention, MADisruption, SkipLayers
from ..kernels import gated_residual
from .attention import attention


@dataclass(frozen=True)
class Fork:
    """The MA disruption at the output of block ``block``, on ``rows`` rows from row ``start``.

    append: True for ``fork`` (disrupted copies of those rows are appended after the batch),
    False for ``disrupt`` (the rows themselves are disrupted). channels: (D,) bool table on the
    model's device; rho: a number, or (rows,) one per row; token_mask: (N_image,) bool or None.
    """

    rows: int
    append: bool
    block: int
    channels: torch.Tensor
    rho: float | torch.Tensor
    streams: tuple[str, ...]
    token_mask: torch.Tensor | None = None
    start: int = 0

    def residual(self, x, y, gate, stream: str, text_len: int = 0):
        """``x + gate*y`` for one stream of the fork block, with this fork applied.

        ``stream`` is "image", "text" or "joint" (``text_len`` text tokens first, then image tokens).
        """
        if stream != "joint" and stream not in self.streams:  # untouched: exact copies (or nothing)
            return gated_residual(x, y, gate, self.rows if self.append else 0, fork_start=self.start)
        N = x.shape[1]
        token_range, mask = None, self.token_mask
        if stream == "text":
            mask = None
        elif stream == "joint" and "text" not in self.streams:
            token_range = (text_len, N)
        elif stream == "joint" and "image" not in self.streams:
            token_range, mask = (0, text_len), None
        images = N - text_len if stream == "joint" else N
        if mask is not None and mask.shape[0] != images:
            raise ValueError(f"the MA spec's token_mask has {mask.shape[0]} entries; this image has {images} "
                             "image tokens (one per patch): build the mask for this size")
        return gated_residual(x, y, gate, self.rows, append=self.append, channels=self.channels, rho=self.rho,
                              token_range=token_range, token_mask=mask, fork_start=self.start)

    def extend(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor's rows after the fork block."""
        return torch.cat([t, t[self.start:self.start + self.rows]]) if self.append else t


Tap = Callable[[str, torch.Tensor, torch.Tensor, int], None]  # (stream, output, gate, text_len)


@dataclass(frozen=True)
class BlockRows:
    """What one block does differently for some of its rows.

    identity: (start, stop) row ranges whose image-to-image attention is the identity (PAG);
    fork: the MA fork acting on the block's last residual (DG), or None;
    tap: called with each stream's output of the last residual (the MA probe), or None.
    """

    identity: tuple = ()
    fork: Fork | None = None
    tap: Tap | None = None

    def attention(self, q, k, v, text: int = 0, key_text: int | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """Joint attention, q, k, v (B, H, L, Dh) -> (B, L, H*Dh); ``text``: leading text tokens
        of the queries (and of the keys, unless ``key_text`` says otherwise); ``mask``: bool, True =
        may attend, broadcastable to (B, H, Lq, Lk) (a text padding mask: (B, 1, 1, Lk))."""
        return attention(q, k, v, self.identity, text, text if key_text is None else key_text, mask)

    def residual(self, x, y, gate, stream: str, text_len: int = 0) -> torch.Tensor:
        """The block's last residual, ``x + gate * y``, for one stream ("image", "text" or "joint"
        with ``text_len`` text tokens first): the fork acts here."""
        out = gated_residual(x, y, gate) if self.fork is None else self.fork.residual(x, y, gate, stream, text_len)
        if self.tap is not None:
            self.tap(stream, out, gate, text_len)
        return out


PLAIN = BlockRows()


def _rows(cond, pick: Callable):
    """Apply ``pick`` to a per-row tensor, or to each of a tuple of them (None stays None)."""
    if isinstance(cond, tuple):
        return tuple(None if t is None else pick(t) for t in cond)
    return None if cond is None else pick(cond)


class RowPlan:
    """The row layout of one forward call: the B input rows first, then each branch as it is
    born. ``run`` runs one block on the rows that run it; ``finish`` puts the output rows in
    the caller's order."""

    def __init__(self, batch: int, total_blocks: int, branches=(), disruption: slice | None = None,
                 make_fork: Callable | None = None, ma_block: int = -1, taps=(), cache=None):
        """``disruption``: in-place MA rows (a slice) for ``disrupt=``; ``make_fork(source, append)``
        builds the Fork of an MA branch or of the disruption, which act at block ``ma_block``.
        ``taps``: callables ``tap(block, stream, output, gate, text_len)`` (the MA probe);
        ``cache``: a ``models.cache.StepCache`` (step caching), or None."""
        self.batch, self.make_fork, self.ma_block, self.taps = batch, make_fork, ma_block, tuple(taps)
        self.total_blocks, self.cache = total_blocks, cache
        self._state = {"layout": ((None, batch),)}  # (branch index or None for the input rows, rows), in row order
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

    @property
    def layout(self) -> tuple:
        """The rows of the call so far: (branch index or None for the input rows, rows), in row order."""
        return self._state["layout"]

    @layout.setter
    def layout(self, layout: tuple) -> None:
        # kept in a dict: torch 2.13's dynamo drops an attribute change of an object made inside the
        # compiled function when a torch.cond follows (a cached step), not a dict item's
        self._state["layout"] = layout

    def _segments(self, layout=None):
        start = 0
        for j, n in self.layout if layout is None else layout:
            yield j, start, start + n
            start += n

    def _enter(self, i: int, streams: tuple, cond, layout: tuple):
        """Append the copies of the branches born at the input of block ``i``."""
        for j, first in enumerate(self.first):
            if first == i:
                src = self.branches[j].source
                streams = _rows(streams, lambda t: torch.cat([t, t[src]]))
                cond = _rows(cond, lambda t: torch.cat([t, t[src]]))
                layout = (*layout, (j, src.stop - src.start))
        return streams, cond, layout

    def _fork(self, i: int) -> Fork | None:
        if i != self.ma_block:
            return None
        if self.disruption is not None:
            return self.make_fork(self.disruption, False)
        if self.ma_branch is not None:
            return self.make_fork(self.branches[self.ma_branch].source, True)
        return None

    def _tap(self, i: int):
        if not self.taps:
            return None
        return lambda stream, out, gate, text_len: [t(i, stream, out, gate, text_len) for t in self.taps]

    def run(self, i: int, block: Callable, streams: tuple, cond, *args):
        """``block(*streams, cond, *args, rows=BlockRows)`` on the rows that run block ``i``; the
        rows SLG skips keep their input. ``cond`` is the per-row conditioning (a tensor, or a
        tuple of them), handed on unchanged. Returns (streams, cond), with the rows born at this
        block appended to both."""
        out, cond, self.layout = self._step(i, block, tuple(streams), cond, args, self.layout)
        return out, cond

    def _step(self, i: int, block: Callable, streams: tuple, cond, args: tuple, layout: tuple):
        """``run`` without changing the plan: the row layout goes in and comes out."""
        streams, cond, layout = self._enter(i, streams, cond, layout)
        fork = self._fork(i)
        skip = {j for j, br in enumerate(self.branches)
                if isinstance(br.perturbation, SkipLayers) and i in br.perturbation.layers}
        keep = [(j, a, b) for j, a, b in self._segments(layout) if j not in skip]
        identity, row = [], 0
        for j, a, b in keep:  # PAG rows, counted among the rows that run
            if j is not None and isinstance(self.branches[j].perturbation, IdentityAttention) \
                    and i in self.branches[j].perturbation.layers:
                identity.append((row, row + b - a))
            row += b - a
        rows = BlockRows(tuple(identity), fork, self._tap(i))
        if len(keep) == len(layout):
            out = _tuple(block(*streams, cond, *args, rows=rows))
        else:
            pick = [(a, b) for _, a, b in keep]
            sub = _tuple(block(*_rows(streams, lambda t: _gather(t, pick)), _rows(cond, lambda t: _gather(t, pick)),
                               *args, rows=rows))
            out = tuple(None if o is None else self._merge(o, t, skip, row, layout) for o, t in zip(sub, streams))
        if fork is not None and fork.append:
            cond = _rows(cond, fork.extend)
            layout = (*layout, (self.ma_branch, fork.rows))
        return out, cond, layout

    def run_blocks(self, blocks, streams: tuple, cond, *args, start: int = 0):
        """``run`` each of ``blocks`` in turn, their global indices from ``start``: the model's block loop.
        With a step cache (``models.cache``), the middle blocks may be skipped instead."""
        cache, streams, end = self.cache, tuple(streams), start + len(blocks)
        if cache is None:
            for i, block in enumerate(blocks, start):
                streams, cond = self.run(i, block, streams, cond, *args)
            return streams, cond
        first, last = cache.policy.first, self.total_blocks - cache.policy.last  # the middle: first..last-1
        if start == 0:
            cache.head_in, self.head_layout = streams, self.layout
            if cache.reads_input:
                cache.probe_input(blocks[0].modulated_input(*streams, cond))
        i = start
        while i < min(end, first):
            streams, cond = self.run(i, blocks[i - start], streams, cond, *args)
            i += 1
        if start < first <= end:  # the first blocks end in this stack
            if len(cache.head_in) != len(streams):
                raise ValueError(f"the cache's first={first} blocks must lie in the model's first stack of blocks; "
                                 "give a smaller first=")
            head_in = tuple(self._extend(t, self.head_layout, self.layout) for t in cache.head_in)
            cache.probe_head(head_in, streams)
        if i < min(end, last):
            streams, cond = self._cached(blocks[i - start:min(end, last) - start], i, streams, cond, args)
            i = min(end, last)
            if i == last:
                cache.count()
        while i < end:
            streams, cond = self.run(i, blocks[i - start], streams, cond, *args)
            i += 1
        return streams, cond

    def _layout_after(self, first: int, end: int, layout: tuple) -> tuple:
        """The row layout after blocks first..end-1 from ``layout``: the rows branches add there."""
        for i in range(first, end):
            layout = (*layout, *((j, br.source.stop - br.source.start)
                                 for j, (f, br) in enumerate(zip(self.first, self.branches)) if f == i))
            if i == self.ma_block and self.ma_branch is not None and self.disruption is None:
                source = self.branches[self.ma_branch].source
                layout = (*layout, (self.ma_branch, source.stop - source.start))
        return layout

    def _extend(self, t, before: tuple, after: tuple):
        """A per-row tensor in layout ``before`` -> in layout ``after``: each row a copy of the row it
        started from (a branch born in between starts from its source rows)."""
        if t is None or before == after:
            return t
        where = {j: (a, b) for j, a, b in self._segments(before)}
        return torch.cat([t[slice(*where[j])] if j in where else t[self.branches[j].source] for j, _ in after])

    def _cached(self, blocks, first: int, streams: tuple, cond, args: tuple):
        """Blocks first.. of the cache's middle, computed (their residual kept, per row) or skipped (the
        rows as they came, plus the residual of the last computed step); one decision for the batch."""
        cache, before = self.cache, self.layout
        after = self._layout_after(first, first + len(blocks), before)
        stored = cache.residuals.get((first, first + len(blocks)))

        def extended(inputs):
            return tuple(self._extend(t, before, after) for t in inputs)

        def compute(*inputs):
            out, rows, layout = _refill(streams, inputs), cond, before
            for i, block in enumerate(blocks, first):
                out, rows, layout = self._step(i, block, out, rows, args, layout)
            return out, tuple(None if o is None else o - e for o, e in zip(out, extended(_refill(streams, inputs))))

        self.layout = after
        operands = _present(streams)
        fits = stored is not None and stored[0] == after and all(
            r is None or (e is not None and r.shape == e.shape) for r, e in zip(stored[1], extended(streams)))
        if cache.skip is None or not fits:  # a forced step, or no residual of these rows yet
            out, residual = compute(*operands)
        else:
            template = stored[1]  # None where these blocks end a stream (SD3's text after its last block)

            def run(*inputs):
                out, residual = compute(*inputs)
                return (*_present(out), *_present(residual))

            def reuse(*inputs):
                ext = extended(_refill(streams, inputs))
                # the residuals come back as copies: a torch.cond branch may not return its input
                return (*(e + r for e, r in zip(ext, template) if r is not None), *(r.clone() for r in _present(template)))

            if torch.compiler.is_compiling():
                flat = torch.cond(cache.skip, reuse, run, operands)
            else:  # eager: the decision read once per step
                flat = reuse(*operands) if bool(cache.skip) else run(*operands)
            k = len(_present(template))
            out, residual = _refill(template, flat[:k]), _refill(template, flat[k:])
        cache.residuals[(first, first + len(blocks))] = (after, residual)
        return out, _rows(cond, lambda t: self._extend(t, before, after))

    def _merge(self, ran: torch.Tensor, before: torch.Tensor, skip: set, n_ran: int, layout: tuple) -> torch.Tensor:
        """The rows in layout order again: those that ran from ``ran``, skipped ones from
        ``before``; then whatever the block appended after its ``n_ran`` rows (a fork)."""
        pieces, row = [], 0
        for j, a, b in self._segments(layout):
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


def _present(values: tuple) -> tuple:
    return tuple(v for v in values if v is not None)


def _refill(template: tuple, values) -> tuple:
    """``values`` in the places of ``template`` that are not None (None stays None)."""
    values = iter(values)
    return tuple(None if t is None else next(values) for t in template)


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _gather(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return t[ranges[0][0]:ranges[0][1]] if len(ranges) == 1 else torch.cat([t[a:b] for a, b in ranges])


def row_indices(rows, batch: int, name: str) -> tuple[int, ...]:
    """The rows a ``disrupt`` / ``fork`` argument names, ascending: a slice (static: traces
    into one graph), or a (B,) bool mask as a tensor or a sequence."""
    if isinstance(rows, slice):
        picked = range(*rows.indices(batch))
        if picked.step != 1:
            raise ValueError(f"{name} as a slice must be contiguous (step 1), got {rows}")
        return tuple(picked)
    if torch.is_tensor(rows):
        if rows.shape != (batch,) or rows.dtype != torch.bool:
            raise ValueError(f"{name} must be a ({batch},) bool mask or a slice of rows, "
                             f"got {rows.dtype} of shape {tuple(rows.shape)}")
        rows = rows.tolist()  # one read of a user-given mask; pass a slice to avoid it
    rows = list(rows)
    if len(rows) != batch or not all(isinstance(r, bool) for r in rows):
        raise ValueError(f"{name} must be a ({batch},) bool mask or a slice of rows, got {rows!r}")
    return tuple(b for b, r in enumerate(rows) if r)


def per_row(value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A number or a (B,) / (1,) / 0-d tensor -> (B,) float32 on ``like``'s device; a number
    is filled on the device (no host-to-device copy)."""
    if torch.is_tensor(value):
        return value.to(device=like.device, dtype=torch.float32).reshape(-1).expand(batch)
    return torch.full((batch,), float(value), dtype=torch.float32, device=like.device)
