"""The process group: join it from torchrun's environment, leave it, share work and report.

Every helper is a no-op with one process (no group): the one-process path is the default.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import torch

_JOINED = False  # True while the default process group is the one ``init`` joined


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
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (a rank aborted at exit)
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


def split_sizes(n: int, size: int) -> tuple[int, ...]:
    """``n`` things over ``size`` ranks, as equal as can be, the first shares one longer."""
    base, extra = divmod(n, size)
    return tuple(base + (r < extra) for r in range(size))


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


def progress(rank: int, size: int, done: int, total: int, what: str) -> None:
    """One line per finished image, prefixed by the rank when there are several."""
    who = f"rank {rank}/{size}: " if size > 1 else ""
    sys.stderr.write(f"{who}image {done}/{total}: {what}\n")  # one write: ranks share the terminal
    sys.stderr.flush()
