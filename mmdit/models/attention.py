"""Joint attention, PAG's identity rows, and where a forward's tokens live.

In one process every token is here. Under sequence parallelism (``mmdit.distributed.sequence``)
a ``TokenLayout`` is installed for the duration of a call: the model's streams are cut over
the ranks after the embeddings (``shard_tokens``), attention runs through the layout's
all-to-all, and the output tokens are gathered (``gather_tokens``). Without one, both are
the identity.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_LAYOUT = None  # the installed TokenLayout, or None: every token in this process

# The order SDPA tries its CUDA backends in, ours rather than torch's default: cuDNN (fastest on
# Hopper at head_dim 64 / 128 in bf16, by NVIDIA's and PyTorch's published numbers), then flash,
# then memory-efficient, then math. benchmarks/gpu_check measures each where one is available.
SDPA_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


@contextmanager
def sdpa_backends(device):
    """Inside, SDPA on CUDA tries the backends in ``SDPA_ORDER``; elsewhere nothing changes."""
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_ORDER], set_priority=True):
        yield


@contextmanager
def tokens_over(layout):
    """Run the forwards inside with the tokens split as ``layout`` says."""
    global _LAYOUT
    before, _LAYOUT = _LAYOUT, layout
    try:
        yield
    finally:
        _LAYOUT = before


def shard_tokens(t: torch.Tensor, stream: str, dim: int = 1) -> torch.Tensor:
    """This rank's share of the "text" or "image" tokens (along ``dim``); all of them in one process."""
    return t if _LAYOUT is None else _LAYOUT.shard(t, stream, dim)


def gather_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, local tokens, F) -> (B, all tokens, F) in the stream's order; the identity in one process."""
    return t if _LAYOUT is None else _LAYOUT.gather(t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity=(), q_text: int = 0,
              k_text: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, H, L, Dh) -> (B, L, H*Dh).

    ``identity``: (start, stop) row ranges whose image tokens attend to no other image token
    (PAG's perturbed rows); the first ``q_text`` query and ``k_text`` key tokens are text.
    ``mask``: bool, True = may attend, broadcastable to (B, H, Lq, Lk): e.g. (B, 1, 1, Lk) for the
    text's padding (its rows follow the batch's: DG's forked rows carry their source's).
    """
    if _LAYOUT is not None:  # sequence parallel: this rank's tokens, every rank's keys
        if mask is not None:
            raise ValueError("a model with an attention mask (text padding) does not run with "
                             "parallel='sequence' (its keys are spread over the ranks); use parallel='branch'")
        return _LAYOUT.attention(q, k, v, identity)
    if not identity:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    pag = identity_mask(q.shape[2], k.shape[2], q_text, k_text, q.device)
    pieces, row = [], 0
    for a, b in [*identity, (q.shape[0], q.shape[0])]:
        if row < a:
            pieces.append(F.scaled_dot_product_attention(q[row:a], k[row:a], v[row:a], attn_mask=_rows(mask, row, a)))
        if a < b:
            both = pag if mask is None else pag & _rows(mask, a, b)
            pieces.append(F.scaled_dot_product_attention(q[a:b], k[a:b], v[a:b], attn_mask=both))
        row = b
    return torch.cat(pieces).transpose(1, 2).flatten(2)


def _rows(mask: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    """Rows a..b of a mask with a batch dimension (one of size 1 broadcasts)."""
    return mask if mask is None or mask.dim() < 4 or mask.shape[0] == 1 else mask[a:b]


def identity_mask(q_len: int, k_len: int, q_text: int, k_text: int, device) -> torch.Tensor:
    """(q_len, k_len) bool, True = may attend: everything, except image query i to image key j != i."""
    qi = torch.arange(q_len, device=device) - q_text
    kj = torch.arange(k_len, device=device) - k_text
    return (qi[:, None] < 0) | (kj[None, :] < 0) | (qi[:, None] == kj[None, :])
