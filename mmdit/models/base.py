"""What every family's transformer shares: the MA spec (``model.ma``) and the rows a call runs."""
from __future__ import annotations

import torch
from torch import nn

from ..branches import Branch, MADisruption
from .rows import Fork, RowPlan, per_row, row_indices


class Transformer(nn.Module):
    """``v = model(x, sigma, *inputs, fork=None, disrupt=None, branches=(), **named)``.

    x: (B, C, H, W); sigma: (B,) or a number, in [0, 1] (1 = pure noise); the rest are the
    family's conditioning (its ``velocity`` names them). DG and the other guidance branches
    are rows of the same call:

    fork: rows (a slice, or a (B,) bool mask) whose MA-disrupted copies are appended (DG);
    disrupt: rows disrupted in place; branches: more perturbed copies (``mmdit.branches``),
    appended after the fork's rows in the order given; cache: a sampling run's step cache
    (``models.cache``; the sampler makes and hands it), which may skip the middle blocks.

    A family sets ``self.config`` and implements ``velocity(x, sigma, *inputs, rows=RowPlan,
    **named)``, running each block through ``rows.run``.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("ma_channels", None, persistent=False)  # (D,) bool, the spec's channels
        self.register_buffer("ma_token_mask", None, persistent=False)
        self.taps = []  # callables (block, stream, output, gate, text_len): the MA probe

    def blocks(self) -> list[nn.Module]:
        """Every block in order: the global numbering of ``MASpec.block`` (FLUX: double, then single)."""
        return [block for name, group in self.named_children() if name.endswith("blocks") for block in group]

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

    def forward(self, x, sigma, *inputs, disrupt=None, fork=None, branches=(), cache=None, **named):
        B = x.shape[0]
        sigma = per_row(sigma, B, x)
        if disrupt is not None and fork is not None:
            raise ValueError("give either disrupt or fork, not both")
        rows = ()
        if disrupt is not None or fork is not None:
            rows = row_indices(fork if fork is not None else disrupt, B, "fork" if fork is not None else "disrupt")
        ma = any(isinstance(b.perturbation, MADisruption) for b in branches)
        if (rows or ma) and self.ma is None:
            raise ValueError("disrupt/fork need an MA spec: set model.ma = mmdit.MASpec(channels, block) "
                             "or calibrate one with `mmdit calibrate-ma`")
        if not rows or rows == tuple(range(rows[0], rows[-1] + 1)):  # contiguous: the static path
            plan = self._plan(x, sigma, rows, fork is not None, branches, cache)
            return plan.finish(self.velocity(x, sigma, *inputs, rows=plan, **named))
        if branches or cache is not None:
            raise ValueError("with branches or a step cache, give fork / disrupt as a slice of contiguous rows")
        # Other rows: move them last, run the static path, put the B rows back in order.
        order = [b for b in range(B) if b not in rows] + list(rows)
        back = [order.index(b) for b in range(B)]
        pick = [torch.tensor(order, device=x.device), torch.tensor(back, device=x.device)]

        def moved(t):  # a per-row input (a tensor, or a tuple of them) in the new row order
            if isinstance(t, tuple):
                return tuple(map(moved, t))
            return t.index_select(0, pick[0]) if torch.is_tensor(t) and t.dim() and t.shape[0] == B else t

        x, sigma, inputs, named = moved(x), moved(sigma), map(moved, inputs), {k: moved(v) for k, v in named.items()}
        plan = self._plan(x, sigma, tuple(range(B - len(rows), B)), fork is not None, ())
        out = plan.finish(self.velocity(x, sigma, *inputs, rows=plan, **named))
        return torch.cat([out[:B].index_select(0, pick[1]), out[B:]])

    def _plan(self, x, sigma, rows: tuple, append: bool, branches, cache=None) -> RowPlan:
        """The RowPlan of a call with contiguous fork / disrupt ``rows`` and the branches."""
        source = slice(rows[0], rows[-1] + 1) if rows else None
        if append and source is not None:
            branches = (Branch(source, MADisruption()), *branches)
        spec = self.ma

        def make_fork(src: slice, fork_append: bool) -> Fork:
            channels, mask = self.ma_channels, self.ma_token_mask
            if channels.device != x.device:  # the model was moved without .to() (e.g. loaded in place)
                channels = channels.to(x.device)
                mask = None if mask is None else mask.to(x.device)
            return Fork(src.stop - src.start, fork_append, spec.block, channels, spec.rho_for(sigma[src]),
                        spec.streams, mask, src.start)

        return RowPlan(x.shape[0], self.config.total_blocks, branches, None if append else source, make_fork,
                       -1 if spec is None else spec.block, self.taps, cache)
