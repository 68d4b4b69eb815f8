"""Pick the Triton kernel or the torch reference for a call."""
import os

import torch


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
        return True
    return x.is_cuda
