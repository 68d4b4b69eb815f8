"""Pieces shared by the SD3 and FLUX transformers: embedders, attention, the MA fork."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .branches import Branch, MADisruption, Rows
from .kernels import gated_residual, modulate


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first: t (B,) -> (B, dim), fp32 (same as SD3, BFL, diffusers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (FLUX names: in_layer, out_layer)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class SequentialEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (SD3 names: mlp.0, mlp.2)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.mlp(x)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear projection to the output features."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # original order: (shift, scale)
        return self.linear(modulate(x, shift, scale))


@dataclass
class Modulation:
    """One adaLN triple, each (B, D)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None


def modulations(params: torch.Tensor, n: int) -> list[Modulation]:
    """Split the adaLN linear output (B, n*D) into shift/scale(/gate) groups, original order."""
    chunks = params.chunk(n, dim=1)
    if n == 2:
        return [Modulation(chunks[0], chunks[1])]
    return [Modulation(*chunks[i:i + 3]) for i in range(0, n, 3)]


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, L, 3*H*Dh) -> q, k, v views, each (B, L, H, Dh)."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, heads, -1).unbind(2)
    return q, k, v


# Sequence parallelism (``mmdit.ulysses``): while a token layout is installed, the model's streams
# are split over ranks by token after the embeddings (``shard_tokens``), joint attention runs
# through the layout's all-to-all, and the output tokens are gathered (``gather_tokens``).
# None (always, in one process): all three are the identity.
_TOKENS = None


@contextmanager
def tokens_over(layout):
    """Run the forwards inside with the tokens split as ``layout`` says (``mmdit.ulysses``)."""
    global _TOKENS
    before, _TOKENS = _TOKENS, layout
    try:
        yield
    finally:
        _TOKENS = before


def shard_tokens(t: torch.Tensor, stream: str, dim: int = 1) -> torch.Tensor:
    """This rank's share of the "text" or "image" tokens (along ``dim``); all of them in one process."""
    return t if _TOKENS is None else _TOKENS.shard(t, stream, dim)


def gather_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, local tokens, F) -> (B, all tokens, F) in the stream's order; the identity in one process."""
    return t if _TOKENS is None else _TOKENS.gather(t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identity=(), q_text: int = 0,
              k_text: int = 0) -> torch.Tensor:
    """q, k, v: (B, H, L, Dh) -> (B, L, H*Dh).

    ``identity``: (start, stop) row ranges whose image tokens attend to no other image token
    (PAG's perturbed rows); the first ``q_text`` query and ``k_text`` key tokens are text.
    """
    if _TOKENS is not None:  # sequence parallel: this rank's tokens, every rank's keys
        return _TOKENS.attention(q, k, v, identity)
    if not identity:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    mask = identity_mask(q.shape[2], k.shape[2], q_text, k_text, q.device)
    pieces, row = [], 0
    for a, b in [*identity, (q.shape[0], q.shape[0])]:
        if row < a:
            pieces.append(F.scaled_dot_product_attention(q[row:a], k[row:a], v[row:a]))
        if a < b:
            pieces.append(F.scaled_dot_product_attention(q[a:b], k[a:b], v[a:b], attn_mask=mask))
        row = b
    return torch.cat(pieces).transpose(1, 2).flatten(2)


def identity_mask(q_len: int, k_len: int, q_text: int, k_text: int, device) -> torch.Tensor:
    """(q_len, k_len) bool, True = may attend: everything, except image query i to image key j != i."""
    qi = torch.arange(q_len, device=device) - q_text
    kj = torch.arange(k_len, device=device) - k_text
    return (qi[:, None] < 0) | (kj[None, :] < 0) | (qi[:, None] == kj[None, :])


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class Fork:
    """The MA disruption at the output of block ``block``, on ``rows`` rows from row ``start``.

    append: True for ``fork`` (disrupted copies of those rows are appended after the batch),
    False for ``disrupt`` (the rows themselves are disrupted). channels: (D,) bool table on the
    model's device; rho: a number, or (rows,) one per row; token_mask: (N_image,) bool or None.
    Everything is static (counts and ranges), so no launch waits on tensor values.
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

        ``stream`` is "image", "text" or "joint" (FLUX single blocks: ``text_len`` text
        tokens first, then image tokens).
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
        """The conditioning vector's rows after the fork block."""
        return torch.cat([t, t[self.start:self.start + self.rows]]) if self.append else t


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


class Transformer(nn.Module):
    """What SD3 and FLUX share: input checks, the MA spec (``model.ma``) and the rows it acts on.

    Subclasses set ``self.config`` and implement ``velocity(x, sigma, context, pooled,
    guidance, rows)``, running each block through ``rows`` (a ``branches.Rows``).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("ma_channels", None, persistent=False)  # (D,) bool, the spec's channels
        self.register_buffer("ma_token_mask", None, persistent=False)

    @property
    def ma(self):
        """The MASpec used by ``disrupt`` / ``fork`` (None: none set). Checked against the model
        when set; its channel table then lives on the model's device."""
        return self.__dict__.get("_ma")

    @ma.setter
    def ma(self, spec):
        if spec is not None:
            total, hidden = self.config.total_blocks, self.config.hidden_size
            if not 0 <= spec.block < total:
                raise ValueError(f"MA block {spec.block} outside 0..{total - 1}: this model has {total} blocks")
            bad = [c for c in spec.channels if not 0 <= c < hidden]
            if bad:
                raise ValueError(f"MA channels {bad} outside 0..{hidden - 1}: the hidden size is {hidden}")
        device = next(self.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        channels = mask = None
        if spec is not None:
            channels = torch.zeros(self.config.hidden_size, dtype=torch.bool)
            channels[list(spec.channels)] = True
            channels = channels.to(device)
            mask = None if spec.token_mask is None else spec.token_mask.to(device=device, dtype=torch.bool)
        self.ma_channels, self.ma_token_mask = channels, mask
        self.__dict__["_ma"] = spec

    def forward(self, x, sigma, context, pooled, guidance=None, disrupt=None, fork=None, branches=()):
        """Velocity (B [+ branch rows], C, H, W); see the family's ``velocity`` for the inputs.

        fork: rows (a slice, or a (B,) bool mask) whose MA-disrupted copies are appended (DG);
        disrupt: rows disrupted in place; branches: more perturbed copies (``mmdit.branches``),
        appended after the fork's rows in the order given.
        """
        B = x.shape[0]
        cfg = self.config
        if context.shape[-1] != cfg.context_dim or pooled.shape[-1] != cfg.pooled_dim:
            raise ValueError(f"this model takes context (B, L, {cfg.context_dim}) and pooled (B, {cfg.pooled_dim}), "
                             f"got {tuple(context.shape)} and {tuple(pooled.shape)}")
        sigma = per_row(sigma, B, x)
        guidance = None if guidance is None else per_row(guidance, B, x)
        if disrupt is not None and fork is not None:
            raise ValueError("give either disrupt or fork, not both")
        rows = ()
        if disrupt is not None or fork is not None:
            append = fork is not None
            rows = row_indices(fork if append else disrupt, B, "fork" if append else "disrupt")
        ma = any(isinstance(b.perturbation, MADisruption) for b in branches)
        if (rows or ma) and self.ma is None:
            raise ValueError("disrupt/fork need an MA spec: set model.ma = mmdit.MASpec(channels, block) "
                             "or calibrate one with `mmdit calibrate-ma`")
        if not rows or rows == tuple(range(rows[0], rows[-1] + 1)):  # contiguous: the static path
            return self._rows_forward(x, sigma, context, pooled, guidance, rows, fork is not None, branches)
        if branches:
            raise ValueError("with branches, give fork / disrupt as a slice of contiguous rows")
        # Other rows: move them last, run the static path, put the B rows back in order.
        order = [b for b in range(B) if b not in rows] + list(rows)
        back = [order.index(b) for b in range(B)]
        pick = [torch.tensor(order, device=x.device), torch.tensor(back, device=x.device)]

        def moved(t):
            return t if t is None or t.shape[0] != B else t.index_select(0, pick[0])

        out = self._rows_forward(moved(x), moved(sigma), moved(context), moved(pooled), moved(guidance),
                                 tuple(range(B - len(rows), B)), fork is not None, ())
        return torch.cat([out[:B].index_select(0, pick[1]), out[B:]])

    def _rows_forward(self, x, sigma, context, pooled, guidance, rows: tuple, append: bool, branches):
        """The forward with contiguous fork / disrupt ``rows`` and the branches."""
        source = slice(rows[0], rows[-1] + 1) if rows else None
        if append and source is not None:
            branches = (Branch(source, MADisruption()), *branches)
        spec = self.ma

        def make_fork(src: slice, fork_append: bool) -> Fork:
            channels, mask = self.ma_channels, self.ma_token_mask
            if channels.device != x.device:  # the model was moved without .to() (e.g. loaded in place)
                channels = channels.to(x.device)
                mask = None if mask is None else mask.to(x.device)
            n = src.stop - src.start
            return Fork(n, fork_append, spec.block, channels, spec.rho_for(sigma[src]), spec.streams, mask, src.start)

        plan = Rows(x.shape[0], self.config.total_blocks, branches, None if append else source, make_fork,
                    -1 if spec is None else spec.block)
        return plan.finish(self.velocity(x, sigma, context, pooled, guidance, plan))
