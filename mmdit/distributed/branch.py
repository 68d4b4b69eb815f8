"""Generation over several processes on ``torch.distributed`` (launched by ``torchrun``).

Branch parallel. A step's model call has rows ``[uncond | cond]`` and, appended by the model,
the perturbed copies of the cond rows (DG's fork, SLG, PAG: ``mmdit.branches``). The rows are
independent, except that a branch is born from its source rows, so the branches stay with the
cond rows (``plan``):

    2 ranks, CFG (+ DG, SLG, PAG)   rank 0: uncond            rank 1: cond (+ the fork from block m on)
    2 ranks, DG without CFG         rank 0: cond              rank 1: the DG branch alone
    3 ranks, CFG + DG               rank 0: uncond   rank 1: cond   rank 2: the DG branch alone

"The DG branch alone" runs the cond rows with the MA disruption in place (``disrupt=``): it
recomputes the cond rows' blocks 0..m (equal to theirs) and is the degraded branch after m. Per
step, with L blocks and the fork at block m, the ranks then run L, L and L blocks of rows: the
balanced split. With 2 ranks, CFG+DG puts the fork on the cond rank (L and 2L - m - 1 blocks of
rows, against 3L - m - 1 on one rank): the fork's saving stays where the fork is. Ranks beyond the
work of a step (3 ranks, CFG only) wait for the gather.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..denoiser import Denoiser
from .group import CommClock, split_sizes


@dataclass(frozen=True)
class Job:
    """The model call one rank makes: input ``rows``, with the DG fork appended (``fork``) or
    the DG branch alone (``disrupt``), and ``branches`` re-based to these rows. ``pieces``:
    where its output rows go in the whole call's output, as (start, count) in its order."""

    rows: slice
    fork: bool = False
    disrupt: bool = False
    branches: tuple = ()
    pieces: tuple = ()

    @property
    def out_rows(self) -> int:
        return sum(n for _, n in self.pieces)


def plan(n: int, fork: slice | None, branches: tuple, size: int) -> list[Job]:
    """Split one model call over ``size`` ranks: ``n`` input rows, DG's ``fork`` rows and the
    perturbed ``branches`` (all from the same source rows, as ``guided_velocity`` makes them).
    The output layout is the model's: the n rows, the fork's copies, each branch's copies."""
    copied = ([fork] if fork is not None else []) + [br.source for br in branches]
    sources = {(s.start, s.stop) for s in copied}
    whole = [Job(slice(0, n), fork is not None, False, branches, ((0, n + sum(s.stop - s.start for s in copied)),))]
    if len(sources) > 1:  # not a sampler's call: every rank computes all of it
        return whole
    if not sources:  # plain rows: contiguous chunks
        sizes = split_sizes(n, min(size, n))
        return [Job(slice(sum(sizes[:r]), sum(sizes[:r + 1])), pieces=((sum(sizes[:r]), sizes[r]),))
                for r in range(len(sizes))]
    a, b = sources.pop()
    k = b - a
    jobs = []
    if a > 0:
        jobs.append(Job(slice(0, a), pieces=((0, a),)))
    rest = [] if b == n else [Job(slice(b, n), pieces=((b, n - b),))]
    alone = fork is not None and size >= len(jobs) + len(rest) + 2  # a rank of its own for the DG branch
    starts = [n + k * (j + (fork is not None)) for j in range(len(branches))]
    cond_pieces = ((a, k),) + ((() if alone or fork is None else ((n, k),))) + tuple((s, k) for s in starts)
    rebased = tuple(replace(br, source=slice(0, k)) for br in branches)
    jobs.append(Job(slice(a, b), fork is not None and not alone, False, rebased, cond_pieces))
    if alone:
        jobs.append(Job(slice(a, b), disrupt=True, pieces=((n, k),)))
    jobs += rest
    return whole if len(jobs) > size else jobs  # more jobs than ranks: every rank computes all


class BranchParallel(Denoiser):
    """A denoiser whose calls are split over the ranks of the default process group by rows
    (``plan``); each rank runs its rows and one all-gather assembles the whole output on
    every rank. Everything else (``ma``, ``config``, ...) is the wrapped model's.

    ``comm`` (a ``CommClock``) adds up the time spent in the gather when switched on."""

    def __init__(self, model, rank: int, size: int, group=None):
        """``rank`` and ``size`` within ``group`` (None: the default process group)."""
        super().__init__(model)
        self.rank, self.size, self.group = rank, size, group
        self.comm = getattr(model, "comm", None) or CommClock()  # shared with a SequenceParallel inside

    def __call__(self, x, sigma, *inputs, disrupt=None, fork=None, branches=(), **named):
        n = x.shape[0]
        if disrupt is not None or (fork is not None and not isinstance(fork, slice)):
            raise ValueError("parallel='branch' splits a sampler's rows: give fork as a slice, and no disrupt")
        jobs = plan(n, fork, tuple(branches), self.size)
        if len(jobs) == 1:  # nothing to split: every rank computes the call
            return self.model(x, sigma, *inputs, fork=fork, branches=branches, **named)
        out = None
        if self.rank < len(jobs):
            job = jobs[self.rank]

            def rows(t):  # this job's rows of a per-row input (a tensor, or a tuple of them)
                if isinstance(t, tuple):
                    return tuple(map(rows, t))
                return t[job.rows] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n else t

            k = job.rows.stop - job.rows.start
            kwargs = {"branches": job.branches} if job.branches else {}
            if job.fork:
                kwargs["fork"] = slice(0, k)
            if job.disrupt:
                kwargs["disrupt"] = slice(0, k)
            out = self.model(rows(x), rows(sigma), *map(rows, inputs), **{k: rows(v) for k, v in named.items()},
                             **kwargs)
        return self._gather(out, jobs, x)

    def _gather(self, out, jobs: list[Job], x) -> torch.Tensor:
        """Every rank's output rows, padded to the longest, gathered once, placed in order."""
        import torch.distributed as dist

        most = max(job.out_rows for job in jobs)
        if out is None:  # a rank without rows this step
            shape = (velocity_channels(self.model.config), *x.shape[2:])
            out = x.new_zeros(most, *shape)
        else:
            out = out.to(x.dtype)
            if out.shape[0] < most:
                out = torch.cat([out, out.new_zeros(most - out.shape[0], *out.shape[1:])])
        parts = [torch.empty_like(out) for _ in range(self.size)]
        with self.comm():
            dist.all_gather(parts, out.contiguous(), group=self.group)
        placed = []
        for job, part in zip(jobs, parts):
            row = 0
            for begin, count in job.pieces:
                placed.append((begin, part[row:row + count]))
                row += count
        return torch.cat([t for _, t in sorted(placed, key=lambda p: p[0])])


def velocity_channels(config) -> int:
    """Channels of the model's output in the unpacked latent layout (FLUX packs 2x2)."""
    return config.out_channels // 4 if config.family in ("flux", "chroma") else config.out_channels
