"""Fused kernels of the MMDiT blocks: Triton on CUDA, a plain-torch reference elsewhere.

Each op lives in its own file with its Triton kernels, its torch reference and its autograd
(on a GPU a ``torch.library.triton_op`` with ``register_autograd``, so torch.compile sees the
kernels; elsewhere an opaque custom op);
``dispatch`` decides which one runs (``MMDIT_KERNELS=torch|triton``).
"""
if __name__ != "mmdit.kernels":
    # This folder was imported as a top-level ``kernels`` (a checkout's root on sys.path):
    # transformers does that when it probes for Hugging Face's ``kernels`` package. Running
    # these files a second time would re-register the mmdit:: custom ops, which makes torch
    # destroy the first registrations and leaves mmdit.kernels calling freed operators.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("mmdit.kernels")
else:
    from .gated_residual import gated_residual
    from .norm_modulate import norm_modulate
    from .qk_norm_rope import qk_norm_rope

    __all__ = ["norm_modulate", "gated_residual", "qk_norm_rope"]
