"""Pick the Triton kernel or the torch reference for a call, register the ops, launch helpers.

``MMDIT_KERNELS`` is read when a call is made (under ``torch.compile``: when it is traced,
so set it before the first compiled call).
"""
import os
import types

if not __name__.startswith("mmdit."):  # see kernels/__init__.py and mmdit/__init__.py
    raise ImportError(f"{__name__} is mmdit's kernels folder imported under another name; import "
                      "mmdit.kernels instead (a second copy would re-register the mmdit:: custom ops)")

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only: elsewhere the kernels are defined but never run
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=None, next_power_of_2=None)
    tl = types.SimpleNamespace(constexpr=object)
    HAS_TRITON = False
else:
    HAS_TRITON = True

# Set before triton is imported (triton.jit reads it then): kernels run on CPU tensors in numpy.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def backend() -> str:
    """``MMDIT_KERNELS`` if set (torch | triton), else ``auto``."""
    value = os.environ.get("MMDIT_KERNELS", "auto").lower()
    if value not in ("auto", "torch", "triton"):
        raise ValueError(f"MMDIT_KERNELS={value!r}; use 'torch', 'triton' or leave it unset")
    return value


def use_triton(x: torch.Tensor) -> bool:
    """Triton for CUDA tensors (or when forced: on CPU it needs TRITON_INTERPRET=1)."""
    mode = backend()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError("MMDIT_KERNELS=triton but triton is not installed")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MMDIT_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "set before mmdit.kernels is imported")
        return True
    return x.is_cuda and HAS_TRITON


def kernel_op(name: str, fake):
    """Register the decorated launcher as the op ``mmdit::<name>``.

    On GPUs it is a ``torch.library.triton_op``: torch.compile sees the Triton kernels it
    launches (``launch``), so inductor schedules them inside the graph and a CUDA graph can
    capture the whole step. The interpreter cannot run on the tensors tracing uses, and without
    triton or a GPU there is nothing to see: there it is an opaque custom op whose ``fake`` (same
    signature, empty outputs) gives the shapes (and ``import mmdit`` does not pay the 1 s that
    ``triton_op`` takes to import inductor).
    """
    def register(fn):
        qualname = f"mmdit::{name}"
        if HAS_TRITON and not INTERPRET and torch.cuda.is_available():
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def launch(kernel):
    """A Triton kernel as launched inside a ``kernel_op`` (traceable by torch.compile)."""
    return torch.library.wrap_triton(kernel) if HAS_TRITON else kernel


def block_size(n: int) -> int:
    """Next power of two >= n (Triton tile sizes must be powers of two; masks cover the rest)."""
    return triton.next_power_of_2(max(int(n), 1))


def num_warps(block: int) -> int:
    """Warps for a tile of ``block`` elements, as in the Triton layer-norm tutorial."""
    return min(max(block // 256, 1), 8)


def num_programs(device: torch.device) -> int:
    """How many programs a reduction kernel should use: a few per SM (4 on the CPU)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def row_chunks(B: int, N: int, device: torch.device) -> tuple[int, int]:
    """(chunks, rows_per_program) for a (B, chunks) grid whose program walks rows of one batch
    entry and adds one partial sum: enough programs to fill the device, no empty chunk."""
    chunks = max(1, min(N, triton.cdiv(num_programs(device), B)))
    rows_per_program = triton.cdiv(N, chunks)
    return triton.cdiv(N, rows_per_program), rows_per_program


@triton.jit
def program_row(N, D, BLOCK_D: tl.constexpr):
    """For kernels with one program per (b, n) row: the row (int64), b, n, the column offsets
    and their mask (BLOCK_D >= D)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    return row, row // N, row % N, offs, offs < D


@triton.jit
def program_chunk(N, D, rows_per_program, BLOCK_D: tl.constexpr):
    """For the (B, chunks) grid of ``row_chunks``: b (int64), the chunk, the column offsets and
    their mask, the chunk's rows [n_start, n_end), and where its partial row goes."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    n_start = chunk * rows_per_program
    part = (b * tl.num_programs(1) + chunk) * D
    return b, offs, offs < D, n_start, tl.minimum(n_start + rows_per_program, N), part
