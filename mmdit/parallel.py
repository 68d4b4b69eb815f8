"""Generation over several processes on ``torch.distributed`` (launched by ``torchrun``).

Four ways to use N ranks, each rank one process (one GPU, or a share of a CPU):

    many images   lines of a prompt file shared among the ranks (``shard``): rank r draws lines
                  r, r + N, ...; each image is exactly the one-process image (same seed, same rows)
    branch        one image, a step's rows split over ranks (``BranchParallel``), one all-gather
                  of the velocities per step
    sequence      one image, its tokens split over ranks, Ulysses all-to-all around attention
                  (``mmdit.ulysses``)
    branch+sequence   both on a 2 x N/2 mesh (``branch_and_sequence``)

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

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .checks import PARALLEL

MODES = PARALLEL
_JOINED = False  # True while the default process group is the one ``init`` joined


# ---------------------------------------------------------------------------------------------
# The process group

def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(device: str = "cpu") -> tuple[int, int]:
    """Join the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` ...): NCCL for CUDA devices, gloo otherwise. Without torchrun (or with
    one process) nothing happens. Returns (rank, world size)."""
    global _JOINED
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
        _JOINED = True
    return world()


def close() -> None:
    """Leave the default process group if ``init`` joined it (at the end of a command); a group
    the caller made is left alone."""
    global _JOINED
    import torch.distributed as dist

    if _JOINED and dist.is_initialized():
        dist.destroy_process_group()
    _JOINED = False


def local_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU, ``cuda:LOCAL_RANK``; others are kept."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


def shard(items: list, rank: int, size: int) -> list:
    """The items rank ``rank`` of ``size`` takes: every size-th, from its rank (round robin, so
    a resumed run with a few lines left still spreads them)."""
    return items[rank::size]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a small Python object: a list of jobs)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(denoiser, mode: str | None, transformer=None):
    """The denoiser run in ``mode`` ("branch", "sequence", or None: as is) over the default
    process group; with one process (no group) it is returned as is."""
    if mode is None:
        return denoiser
    if mode not in MODES:
        raise ValueError(f"parallel={mode!r}: use one of {MODES} (or None)")
    rank, size = world()
    if size == 1:
        return denoiser
    transformer = denoiser if transformer is None else transformer
    if mode == "branch":
        return BranchParallel(denoiser, rank, size)
    from .ulysses import SequenceParallel

    if mode == "sequence":
        return SequenceParallel(denoiser, transformer, rank, size)
    return branch_and_sequence(denoiser, transformer, rank, size)


def branch_and_sequence(denoiser, transformer, rank: int, size: int):
    """Both at once on a 2 x (size / 2) mesh: ranks 0..size/2-1 take the first branch job
    (uncond), the others the second (cond + fork), each job's tokens split over its half
    (Ulysses within a half, the all-gather between ranks holding the same tokens)."""
    import torch.distributed as dist

    from .ulysses import SequenceParallel

    if size < 4 or size % 2:
        raise ValueError(f"parallel='branch+sequence' needs an even number of ranks, 4 or more (2 branch halves "
                         f"of sequence ranks), got {size}")
    half = size // 2
    halves = [dist.new_group(list(range(b * half, (b + 1) * half))) for b in range(2)]  # every rank makes every group
    pairs = [dist.new_group([s, s + half]) for s in range(half)]
    b, s = divmod(rank, half)
    return BranchParallel(SequenceParallel(denoiser, transformer, s, half, halves[b]), b, 2, pairs[s])


# ---------------------------------------------------------------------------------------------
# Branch parallel

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


def split_sizes(n: int, size: int) -> tuple[int, ...]:
    """``n`` things over ``size`` ranks, as equal as can be, the first shares one longer."""
    base, extra = divmod(n, size)
    return tuple(base + (r < extra) for r in range(size))


class BranchParallel:
    """A denoiser whose calls are split over the ranks of the default process group by rows
    (``plan``); each rank runs its rows and one all-gather assembles the whole output on
    every rank. Everything else (``ma``, ``config``, ...) is the wrapped model's.

    ``comm`` (a ``CommClock``) adds up the time spent in the gather when switched on."""

    def __init__(self, model, rank: int, size: int, group=None):
        """``rank`` and ``size`` within ``group`` (None: the default process group)."""
        self.model, self.rank, self.size, self.group = model, rank, size, group
        self.comm = getattr(model, "comm", None) or CommClock()  # shared with a SequenceParallel inside

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, sigma, context, pooled, guidance=None, disrupt=None, fork=None, branches=()):
        n = x.shape[0]
        if disrupt is not None or (fork is not None and not isinstance(fork, slice)):
            raise ValueError("parallel='branch' splits a sampler's rows: give fork as a slice, and no disrupt")
        jobs = plan(n, fork, tuple(branches), self.size)
        if len(jobs) == 1:  # nothing to split: every rank computes the call
            return self.model(x, sigma, context, pooled, guidance=guidance, fork=fork, branches=branches)
        out = None
        if self.rank < len(jobs):
            job = jobs[self.rank]

            def rows(t):
                return t[job.rows] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n else t

            k = job.rows.stop - job.rows.start
            kwargs = {"branches": job.branches} if job.branches else {}
            if job.fork:
                kwargs["fork"] = slice(0, k)
            if job.disrupt:
                kwargs["disrupt"] = slice(0, k)
            out = self.model(rows(x), rows(sigma), rows(context), rows(pooled), guidance=rows(guidance), **kwargs)
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


class CommClock:
    """Seconds spent in collectives (``with clock(): ...``), counted only when ``on``; it then
    synchronizes the GPU around each one, which a real run must not do: benchmarks only."""

    def __init__(self):
        self.on, self.seconds = False, 0.0

    @contextmanager
    def __call__(self):
        if not self.on:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start


def velocity_channels(config) -> int:
    """Channels of the model's output in the unpacked latent layout (FLUX packs 2x2)."""
    return config.out_channels // 4 if config.family == "flux" else config.out_channels


def progress(rank: int, size: int, done: int, total: int, what: str) -> None:
    """One line per finished image, prefixed by the rank when there are several."""
    who = f"rank {rank}/{size}: " if size > 1 else ""
    sys.stderr.write(f"{who}image {done}/{total}: {what}\n")  # one write: ranks share the terminal
    sys.stderr.flush()
