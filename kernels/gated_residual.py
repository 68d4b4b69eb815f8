"""Gated residual ``x + gate * y`` with the massive-activation fork of a range of rows.

With F = ``fork_rows`` and S = ``fork_start`` (default B - F: the last rows), rows S..S+F-1
are the forked (or disrupted) rows:

    out[b] = x[b] + gate[b] * y[b]                                    b < B
    copy(b) = out[b] * (rho_i on channels c in C of tokens n in T, else 1),   i = b - S
    append:   out[B + i] = copy(S + i)               -> (B + F, N, D)   (fork: a branch is born)
    in place: out[b] = copy(b) for S <= b < S + F    -> (B, N, D)       (disrupt)

C = ``channels`` (a (D,) bool table; None: no channel, the copy is exact), rho a number or
(F,) per row, T = {lo <= n < hi} of ``token_range``, and where ``token_mask`` (M,) is given,
only those of the last M tokens (the image tokens) whose mask is True. The rows are static
(a count, not a mask): no launch depends on tensor values, so the step has no host sync.

Backward (f_i = the factor above of row b = B - F + i; g = dL/dout):

    append:   dval[b] = g[b] + g[B + i] * f_i        in place: dval[b] = g[b] * f_i
    (rows outside the range: dval[b] = g[b]);   dx = dval,  dy = gate[b] * dval,  dgate[b] = sum_n dval * y[b]

Precision: x + gate * y is one fp32 fma rounded once to x.dtype; the copy starts from that
rounded value and multiplies in fp32 (as the reference does), so rho = 1 or a channel
outside C gives a bit-identical copy. dgate sums in fp32.
"""
import torch

from .dispatch import (block_size, kernel_op, launch, num_warps, program_chunk, program_row, row_chunks, tl, triton,
                       use_triton)


@triton.jit
def _factor(chan_ptr, rho_ptr, tok_ptr, rho, i, n, N, tok_lo, tok_hi, offs, mask,
            RHO_ROWS: tl.constexpr, TOK_MASK: tl.constexpr, M):
    """The fp32 factor of forked row i, token n: rho on the disrupted channels, else 1."""
    if RHO_ROWS:
        r = tl.load(rho_ptr + i)
    else:
        r = rho
    tok = (n >= tok_lo) & (n < tok_hi)
    if TOK_MASK:
        tok = tok & (tl.load(tok_ptr + n - (N - M), mask=n >= N - M, other=1) != 0)
    hit = (tl.load(chan_ptr + offs, mask=mask, other=0) != 0) & tok
    return tl.where(hit, r, 1.0)


@triton.jit
def _fold_copy(g, dout_ptr, chan_ptr, rho_ptr, tok_ptr, rho, B, i, n, N, tok_lo, tok_hi, M, offs, mask,
               stride_gb, stride_gn, stride_gd, APPEND: tl.constexpr, CHAN: tl.constexpr, RHO_ROWS: tl.constexpr,
               TOK_MASK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dval of forked row i from g = dout[b, n]: the copy's gradient, times its factor, added
    (append) or in place of g (disrupt)."""
    if APPEND:
        g_copy = tl.load(dout_ptr + (B + i) * stride_gb + n * stride_gn + offs * stride_gd,
                         mask=mask, other=0.0).to(tl.float32)
    else:
        g_copy = g
    if CHAN:
        g_copy = g_copy * _factor(chan_ptr, rho_ptr, tok_ptr, rho, i, n, N, tok_lo, tok_hi, offs, mask,
                                  RHO_ROWS, TOK_MASK, M)
    if APPEND:
        g_copy += g
    return g_copy


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr, chan_ptr, rho_ptr, tok_ptr,
    B, N, D, fork_start, fork_rows, rho, tok_lo, tok_hi, M,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_yn, stride_yd,
    stride_gate_b, stride_gate_d,
    FORK: tl.constexpr, APPEND: tl.constexpr, CHAN: tl.constexpr, RHO_ROWS: tl.constexpr,
    TOK_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per source row (b, n): writes out[b, n] and, if b forks, its copy."""
    row, b, n, offs, mask = program_row(N, D, BLOCK_D)

    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + n * stride_yn + offs * stride_yd, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + offs * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    out = (x + gate * y).to(out_ptr.dtype.element_ty)

    tl.store(out_ptr + row * D + offs, out, mask=mask)
    if FORK:
        i = b - fork_start  # in [0, fork_rows): b is the i-th forked row
        if (i >= 0) & (i < fork_rows):
            copy = out.to(tl.float32)
            if CHAN:
                copy = copy * _factor(chan_ptr, rho_ptr, tok_ptr, rho, i, n, N, tok_lo, tok_hi, offs, mask,
                                      RHO_ROWS, TOK_MASK, M)
            if APPEND:
                dst = B + i
            else:
                dst = b  # overwrites the plain row just stored (same program, same lanes)
            tl.store(out_ptr + (dst * N + n) * D + offs, copy.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dx_ptr, dy_ptr, dgate_part_ptr, chan_ptr, rho_ptr, tok_ptr,
    B, N, D, fork_start, fork_rows, rho, tok_lo, tok_hi, M, rows_per_program,
    stride_gb, stride_gn, stride_gd,
    stride_yb, stride_yn, stride_yd,
    stride_gate_b, stride_gate_d,
    FORK: tl.constexpr, APPEND: tl.constexpr, CHAN: tl.constexpr, RHO_ROWS: tl.constexpr,
    TOK_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, chunk) walks rows n of one chunk of batch b: folds the copy's gradient into
    dval, writes dx and dy, and one fp32 partial sum of dgate for the chunk."""
    b, offs, mask, n_start, n_end, part = program_chunk(N, D, rows_per_program, BLOCK_D)

    gate = tl.load(gate_ptr + b * stride_gate_b + offs * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    i = b - fork_start  # in [0, fork_rows): b is the i-th forked row
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(n_start, n_end):
        g = tl.load(dout_ptr + b * stride_gb + n * stride_gn + offs * stride_gd, mask=mask, other=0.0).to(tl.float32)
        if FORK:
            if (i >= 0) & (i < fork_rows):
                g = _fold_copy(g, dout_ptr, chan_ptr, rho_ptr, tok_ptr, rho, B, i, n, N, tok_lo, tok_hi, M, offs, mask,
                               stride_gb, stride_gn, stride_gd, APPEND, CHAN, RHO_ROWS, TOK_MASK, BLOCK_D)
        y = tl.load(y_ptr + b * stride_yb + n * stride_yn + offs * stride_yd, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + (b * N + n) * D + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + (b * N + n) * D + offs, (gate * g).to(dy_ptr.dtype.element_ty), mask=mask)
        dgate += g * y

    tl.store(dgate_part_ptr + part + offs, dgate, mask=mask)


def _fork_args(x, fork_rows, channels, rho_rows, token_mask):
    """Pointer stand-ins the kernels never read (their constexpr flag is off) and the flags."""
    flags = dict(FORK=fork_rows > 0, CHAN=channels is not None, RHO_ROWS=rho_rows is not None,
                 TOK_MASK=token_mask is not None)
    pointers = [x if t is None else t for t in (channels, rho_rows, token_mask)]
    M = 0 if token_mask is None else token_mask.shape[0]
    return pointers, M, flags


@kernel_op("gated_residual", fake=lambda x, y, gate, fork_start, fork_rows, append, *_: x.new_empty(
    (x.shape[0] + (fork_rows if append else 0), *x.shape[1:])))
def _gated_residual_fwd(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, fork_start: int, fork_rows: int,
                        append: bool,
                        channels: torch.Tensor | None, rho: float, rho_rows: torch.Tensor | None,
                        tok_lo: int, tok_hi: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    B, N, D = x.shape
    out = torch.empty((B + (fork_rows if append else 0), N, D), dtype=x.dtype, device=x.device)
    if B * N * D == 0:
        return out
    pointers, M, flags = _fork_args(x, fork_rows, channels, rho_rows, token_mask)
    BLOCK_D = block_size(D)
    launch(_gated_residual_fwd_kernel)[(B * N,)](
        x, y, gate, out, *pointers, B, N, D, fork_start, fork_rows, rho, tok_lo, tok_hi, M,
        *x.stride(), *y.stride(), *gate.stride(),
        APPEND=append, **flags, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
    )
    return out


def _bwd_fake(dout, y, gate, *_):
    B, N, D = y.shape
    return y.new_empty((B, N, D), dtype=dout.dtype), y.new_empty((B, N, D)), y.new_empty((B, D), dtype=torch.float32)


@kernel_op("gated_residual_bwd", fake=_bwd_fake)
def _gated_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, fork_start: int, fork_rows: int,
                        append: bool,
                        channels: torch.Tensor | None, rho: float, rho_rows: torch.Tensor | None,
                        tok_lo: int, tok_hi: int, token_mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (B, N, D) in dout.dtype, dy (B, N, D) in y.dtype, dgate (B, D) in fp32."""
    B, N, D = y.shape
    dx = torch.empty((B, N, D), dtype=dout.dtype, device=y.device)
    dy = torch.empty_like(dx, dtype=y.dtype)
    chunks, rows_per_program = row_chunks(B, N, y.device)
    dgate_part = torch.zeros((B, chunks, D), dtype=torch.float32, device=y.device)
    if dx.numel() > 0:
        pointers, M, flags = _fork_args(y, fork_rows, channels, rho_rows, token_mask)
        BLOCK_D = block_size(D)
        launch(_gated_residual_bwd_kernel)[(B, chunks)](
            dout, y, gate, dx, dy, dgate_part, *pointers, B, N, D, fork_start, fork_rows, rho, tok_lo, tok_hi, M,
            rows_per_program, *dout.stride(), *y.stride(), *gate.stride(),
            APPEND=append, **flags, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
        )
    return dx, dy, dgate_part.sum(1)


def _setup(ctx, inputs, output):
    x, y, gate, fork_start, fork_rows, append, channels, rho, rho_rows, tok_lo, tok_hi, token_mask = inputs
    ctx.save_for_backward(y, gate, channels, rho_rows, token_mask)
    ctx.scalars = fork_start, fork_rows, append, rho, tok_lo, tok_hi
    ctx.x_dtype = x.dtype


def _backward(ctx, dout):
    y, gate, channels, rho_rows, token_mask = ctx.saved_tensors
    fork_start, fork_rows, append, rho, tok_lo, tok_hi = ctx.scalars
    dx, dy, dgate = _gated_residual_bwd(dout, y, gate, fork_start, fork_rows, append, channels, rho, rho_rows,
                                        tok_lo, tok_hi, token_mask)
    return dx.to(ctx.x_dtype), dy, dgate.to(gate.dtype), *[None] * 9


_gated_residual_fwd.register_autograd(_backward, setup_context=_setup)


def disruption_factor(N: int, channels: torch.Tensor, rho, token_range: tuple[int, int] | None = None,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F or 1, N, D) fp32: rho where channel and token are disrupted, 1 elsewhere."""
    lo, hi = token_range or (0, N)
    tokens = torch.zeros(N, dtype=torch.bool, device=channels.device)
    tokens[lo:hi] = True
    if token_mask is not None:
        tokens[N - token_mask.shape[0]:] &= token_mask
    rho = rho.float()[:, None, None] if torch.is_tensor(rho) else float(rho)
    return torch.where(tokens[:, None] & channels[None, :], rho, 1.0)


def gated_residual_reference(x, y, gate, fork_rows: int = 0, append: bool = True, channels=None, rho=0.0,
                             token_range=None, token_mask=None, fork_start: int | None = None):
    """x, y: (B, N, D); gate: (B, D) -> (B + fork_rows, N, D) if append else (B, N, D).

    Rows ``fork_start`` .. + ``fork_rows`` (default: the last rows) are copied (append) or
    replaced (in place) by themselves with the ``channels`` (D,) bool of the chosen tokens
    multiplied by ``rho`` (a number or (F,)).
    """
    out = torch.addcmul(x, gate[:, None], y)  # x + gate * y in one pass
    if fork_rows == 0:
        return out
    B, N, D = x.shape
    start = B - fork_rows if fork_start is None else fork_start
    copy = out[start:start + fork_rows]
    if channels is not None:
        copy = (copy.float() * disruption_factor(N, channels, rho, token_range, token_mask)).to(out.dtype)
    return torch.cat([out, copy] if append else [out[:start], copy, out[start + fork_rows:]])


def gated_residual(x, y, gate, fork_rows: int = 0, *, append: bool = True, channels=None, rho=0.0,
                   token_range: tuple[int, int] | None = None, token_mask=None, fork_start: int | None = None):
    """``x + gate[:, None] * y`` (B, N, D), with ``fork_rows`` rows from ``fork_start`` (default:
    the last rows) forked (appended, disrupted copies) or disrupted in place (``append=False``);
    see the module docstring.

    channels: (D,) bool, the disrupted channels (None: an exact copy); rho: a number or (F,)
    tensor; token_range: (lo, hi) tokens touched (default all); token_mask: (M,) bool over
    the last M tokens. Gradients reach x, y and gate.
    """
    B, N, D = x.shape
    if y.shape != x.shape or gate.shape != (B, D):
        raise ValueError(f"x {tuple(x.shape)} needs y of the same shape and gate {(B, D)}, "
                         f"got {tuple(y.shape)} / {tuple(gate.shape)}")
    start = B - fork_rows if fork_start is None else fork_start
    if not (0 <= fork_rows and 0 <= start and start + fork_rows <= B):
        raise ValueError(f"fork rows {start}..{start + fork_rows - 1} must lie within the {B} rows")
    if channels is not None and (channels.shape != (D,) or channels.dtype != torch.bool):
        raise ValueError(f"channels must be a ({D},) bool table, got {channels.dtype} {tuple(channels.shape)}")
    if torch.is_tensor(rho) and rho.shape != (fork_rows,):
        raise ValueError(f"a per-row rho must have shape ({fork_rows},), got {tuple(rho.shape)}")
    if token_mask is not None and (token_mask.dim() != 1 or token_mask.shape[0] > N):
        raise ValueError(f"token_mask must be 1-D over at most the {N} tokens, got {tuple(token_mask.shape)}")
    if not use_triton(x):
        return gated_residual_reference(x, y, gate, fork_rows, append, channels, rho, token_range, token_mask, start)
    lo, hi = token_range or (0, N)
    rho_rows = rho.float().contiguous() if torch.is_tensor(rho) else None  # an expanded rho has stride 0
    return _gated_residual_fwd(x, y, gate, start, fork_rows, append, channels,
                               0.0 if rho_rows is not None else float(rho), rho_rows, lo, hi, token_mask)
