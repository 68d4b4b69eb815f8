"""Generation over several processes on ``torch.distributed`` (launched by ``torchrun``).

Four ways to use N ranks, each rank one process (one GPU, or a share of a CPU):

    many images   lines of a prompt file shared among the ranks (``group.shard``): rank r draws
                  lines r, r + N, ...; each image is exactly the one-process image
    branch        one image, a step's rows split over ranks (``branch.BranchParallel``), one
                  all-gather of the velocities per step
    sequence      one image, its tokens split over ranks, Ulysses all-to-all around attention
                  (``sequence.SequenceParallel``)
    branch+sequence   both on a 2 x N/2 mesh (``branch_and_sequence``)

    group.py     the process group (join, leave, share lines, report), CommClock
    branch.py    branch parallel: the row plan of a step over the ranks
    sequence.py  sequence parallel: the token layout and its all-to-alls
"""
from __future__ import annotations

from ..checks import PARALLEL
from .branch import BranchParallel
from .group import broadcast, close, init, local_device, progress, shard, world
from .sequence import SequenceParallel

MODES = PARALLEL


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
    if mode == "sequence":
        return SequenceParallel(denoiser, transformer, rank, size)
    return branch_and_sequence(denoiser, transformer, rank, size)


def branch_and_sequence(denoiser, transformer, rank: int, size: int):
    """Both at once on a 2 x (size / 2) mesh: ranks 0..size/2-1 take the first branch job
    (uncond), the others the second (cond + fork), each job's tokens split over its half
    (Ulysses within a half, the all-gather between ranks holding the same tokens)."""
    import torch.distributed as dist

    if size < 4 or size % 2:
        raise ValueError(f"parallel='branch+sequence' needs an even number of ranks, 4 or more (2 branch halves "
                         f"of sequence ranks), got {size}")
    half = size // 2
    halves = [dist.new_group(list(range(b * half, (b + 1) * half))) for b in range(2)]  # every rank makes every group
    pairs = [dist.new_group([s, s + half]) for s in range(half)]
    b, s = divmod(rank, half)
    return BranchParallel(SequenceParallel(denoiser, transformer, s, half, halves[b]), b, 2, pairs[s])


__all__ = ["MODES", "wrap", "branch_and_sequence", "BranchParallel", "SequenceParallel", "world", "init", "close",
           "local_device", "shard", "broadcast", "progress"]
