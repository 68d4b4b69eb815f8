"""Fused kernels of the MMDiT blocks: Triton on CUDA, a plain-torch reference elsewhere.

Each op lives in its own file with its Triton kernels, its torch reference and its
autograd.Function; ``dispatch`` decides which one runs (``MMDIT_KERNELS=torch|triton``).
"""
from .gated_residual import gated_residual
from .modulate import modulate
from .qk_norm_rope import qk_norm_rope

__all__ = ["modulate", "gated_residual", "qk_norm_rope"]
