"""Gated residual ``x + gate * y`` with the masked massive-activation fork.

    out[b] = x[b] + gate[b] * y[b]                                   b < B
    out[B + i] = out[f_i] * (rho_i  on channels c in C of tokens n in T, else 1)

where f_0 < f_1 < ... are the rows with ``fork[f] == True``, C = ``channels`` and
T = {n >= token_start, token_mask[n - token_start]}. The fork rows are the detail-deficient
branch of Detail Guidance: the launch that finishes block m also writes their disrupted copy.

Backward (h = f^-1 the fork row of b, if any; r_h = the factor above for that row):

    dval[b] = g[b] + g[h] * r_h,   dx = dval,   dy = gate[b] * dval,   dgate[b] = sum_n dval * y[b]

Precision: x + gate * y is one fp32 fma rounded once to x.dtype; the fork copy starts from
that rounded value and multiplies in fp32 (as the reference does), so rho = 1 or a channel
outside C gives a bit-identical copy. dgate sums in fp32.
"""
import torch

from .dispatch import block_size, num_warps, program_chunk, program_row, row_chunks, tl, triton, use_triton


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr, fork_row_ptr, rho_ptr, chan_ptr, tok_ptr,
    N, D,
    stride_xb, stride_xn, stride_xd,
    stride_yb, stride_yn, stride_yd,
    stride_gate_b, stride_gate_d,
    HAS_FORK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per source row (b, n): writes out[b, n] and, if b forks, out[fork_row[b], n]."""
    row, b, n, offs, mask = program_row(N, D, BLOCK_D)

    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + n * stride_yn + offs * stride_yd, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * stride_gate_b + offs * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    out = (x + gate * y).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * D + offs, out, mask=mask)

    if HAS_FORK:
        dst = tl.load(fork_row_ptr + b)  # row of b's disrupted copy, -1 if b does not fork
        rho = tl.load(rho_ptr + b)
        hit = (tl.load(chan_ptr + offs, mask=mask, other=0) != 0) & (tl.load(tok_ptr + n) != 0)
        if dst >= 0:
            forked = out.to(tl.float32) * tl.where(hit, rho, 1.0)
            tl.store(out_ptr + (dst * N + n) * D + offs, forked.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, y_ptr, gate_ptr, dx_ptr, dy_ptr, dgate_part_ptr, fork_row_ptr, rho_ptr, chan_ptr, tok_ptr,
    N, D, rows_per_program,
    stride_gb, stride_gn, stride_gd,
    stride_yb, stride_yn, stride_yd,
    stride_gate_b, stride_gate_d,
    HAS_FORK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, chunk) walks rows n of one chunk of batch b: folds the fork row's gradient
    into dval, writes dx and dy, and one fp32 partial sum of dgate for the chunk."""
    b, offs, mask, n_start, n_end, part = program_chunk(N, D, rows_per_program, BLOCK_D)

    gate = tl.load(gate_ptr + b * stride_gate_b + offs * stride_gate_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_FORK:
        dst = tl.load(fork_row_ptr + b)
        rho = tl.load(rho_ptr + b)
        chan = tl.load(chan_ptr + offs, mask=mask, other=0) != 0
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(n_start, n_end):
        g = tl.load(dout_ptr + b * stride_gb + n * stride_gn + offs * stride_gd, mask=mask, other=0.0).to(tl.float32)
        if HAS_FORK:
            if dst >= 0:
                g_fork = tl.load(dout_ptr + dst * stride_gb + n * stride_gn + offs * stride_gd,
                                 mask=mask, other=0.0).to(tl.float32)
                g += g_fork * tl.where(chan & (tl.load(tok_ptr + n) != 0), rho, 1.0)
        y = tl.load(y_ptr + b * stride_yb + n * stride_yn + offs * stride_yd, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + (b * N + n) * D + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_ptr + (b * N + n) * D + offs, (gate * g).to(dy_ptr.dtype.element_ty), mask=mask)
        dgate += g * y

    tl.store(dgate_part_ptr + part + offs, dgate, mask=mask)


def _fork_tables(x, fork_idx, channels, rho, token_start, token_mask):
    """Dense per-row / per-channel / per-token tables the kernels index; without a fork,
    placeholders the kernels never read (HAS_FORK=False)."""
    n_fork = fork_idx.numel()
    if n_fork == 0:
        return (x, x, x, x)
    (B, N, D), device = x.shape, x.device
    fork_row = torch.full((B,), -1, dtype=torch.int64, device=device)
    fork_row[fork_idx] = torch.arange(B, B + n_fork, dtype=torch.int64, device=device)
    rho_row = torch.ones(B, dtype=torch.float32, device=device)
    rho_row[fork_idx] = rho.to(device=device, dtype=torch.float32).expand(n_fork)
    chan = torch.zeros(D, dtype=torch.int8, device=device)
    chan[channels.to(device)] = 1
    tok = torch.arange(N, device=device) >= token_start
    if token_mask is not None:
        tok[token_start:] &= token_mask.to(device=device, dtype=torch.bool)
    return fork_row, rho_row, chan, tok.to(torch.int8)


def _forward(x, y, gate, fork_idx, channels, rho, token_start, token_mask):
    B, N, D = x.shape
    out = torch.empty((B + fork_idx.numel(), N, D), dtype=x.dtype, device=x.device)
    if B * N * D == 0:
        return out
    tables = _fork_tables(x, fork_idx, channels, rho, token_start, token_mask)
    BLOCK_D = block_size(D)
    _gated_residual_fwd_kernel[(B * N,)](
        x, y, gate, out, *tables, N, D,
        *x.stride(), *y.stride(), *gate.stride(),
        HAS_FORK=fork_idx.numel() > 0, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
    )
    return out


def _backward(dout, y, gate, fork_idx, channels, rho, token_start, token_mask):
    """-> dx (B, N, D) in dout.dtype, dy (B, N, D) in y.dtype, dgate (B, D) in fp32."""
    B, N, D = y.shape
    dx = torch.empty((B, N, D), dtype=dout.dtype, device=y.device)
    dy = torch.empty_like(dx, dtype=y.dtype)
    chunks, rows_per_program = row_chunks(B, N, y.device)
    dgate_part = torch.zeros((B, chunks, D), dtype=torch.float32, device=y.device)
    if dx.numel() > 0:
        tables = _fork_tables(y, fork_idx, channels, rho, token_start, token_mask)
        BLOCK_D = block_size(D)
        _gated_residual_bwd_kernel[(B, chunks)](
            dout, y, gate, dx, dy, dgate_part, *tables, N, D, rows_per_program,
            *dout.stride(), *y.stride(), *gate.stride(),
            HAS_FORK=fork_idx.numel() > 0, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
        )
    return dx, dy, dgate_part.sum(1)


# Opaque custom ops: the fake impls give torch.compile the shapes (the number of fork rows is
# fork_idx's length, data-dependent but already known when the op is reached).
@torch.library.custom_op("mmdit::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, fork_idx: torch.Tensor, channels: torch.Tensor,
    rho: torch.Tensor, token_start: int, token_mask: torch.Tensor | None,
) -> torch.Tensor:
    return _forward(x, y, gate, fork_idx, channels, rho, token_start, token_mask)


@_gated_residual_fwd_op.register_fake
def _(x, y, gate, fork_idx, channels, rho, token_start, token_mask):
    B, N, D = x.shape
    return x.new_empty((B + fork_idx.shape[0], N, D))


@torch.library.custom_op("mmdit::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, fork_idx: torch.Tensor, channels: torch.Tensor,
    rho: torch.Tensor, token_start: int, token_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, y, gate, fork_idx, channels, rho, token_start, token_mask)


@_gated_residual_bwd_op.register_fake
def _(dout, y, gate, fork_idx, channels, rho, token_start, token_mask):
    B, N, D = y.shape
    return y.new_empty((B, N, D), dtype=dout.dtype), y.new_empty((B, N, D)), y.new_empty((B, D), dtype=torch.float32)


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, fork_idx, channels, rho, token_start, token_mask):
        ctx.save_for_backward(y, gate, fork_idx, channels, rho, token_mask)
        ctx.token_start = token_start
        ctx.x_dtype = x.dtype
        return _gated_residual_fwd_op(x, y, gate, fork_idx, channels, rho, token_start, token_mask)

    @staticmethod
    def backward(ctx, dout):
        y, gate, fork_idx, channels, rho, token_mask = ctx.saved_tensors
        dx, dy, dgate = _gated_residual_bwd_op(dout, y, gate, fork_idx, channels, rho, ctx.token_start, token_mask)
        return dx.to(ctx.x_dtype), dy, dgate.to(gate.dtype), None, None, None, None, None


def gated_residual_reference(x, y, gate, fork=None, channels=None, rho=0.0, token_start=0, token_mask=None):
    """x, y: (B, N, D); gate: (B, D) -> (B + n_fork, N, D).

    Rows where ``fork`` (B,) is True are appended after the B rows, in order, with
    ``channels`` (K,) of tokens ``>= token_start`` (and, if given, where ``token_mask``
    (N - token_start,) is True) multiplied by ``rho`` (a float or an (n_fork,) tensor).
    """
    out = x + gate[:, None] * y
    if fork is None:
        return out
    forked = out[fork]  # (n, N, D)
    n, N, D = forked.shape
    tokens = torch.arange(token_start, N, device=x.device)
    if token_mask is not None:
        tokens = tokens[token_mask.to(x.device)]
    factor = torch.ones(n, N, D, dtype=torch.float32, device=x.device)
    rho = torch.as_tensor(rho, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    factor[:, tokens[:, None], channels.to(x.device)[None, :]] = rho.expand(n, len(tokens), len(channels))
    return torch.cat([out, (forked.float() * factor).to(out.dtype)])


def gated_residual(x, y, gate, fork=None, channels=None, rho=0.0, token_start=0, token_mask=None):
    """``x + gate[:, None] * y`` (B, N, D), then the disrupted copies of the ``fork`` rows
    (see the module docstring) -> (B + n_fork, N, D). Gradients reach x, y and gate."""
    B, N, D = x.shape
    if y.shape != x.shape or gate.shape != (B, D):
        raise ValueError(f"x {tuple(x.shape)} needs y of the same shape and gate {(B, D)}, "
                         f"got {tuple(y.shape)} / {tuple(gate.shape)}")
    if fork is not None and (fork.shape != (B,) or fork.dtype != torch.bool):
        raise ValueError(f"fork must be a ({B},) bool tensor, got {fork.dtype} {tuple(fork.shape)}")
    if token_mask is not None and token_mask.shape != (N - token_start,):
        raise ValueError(f"token_mask must have shape {(N - token_start,)}, got {tuple(token_mask.shape)}")
    if fork is not None and channels is None:
        channels = torch.zeros(0, dtype=torch.long, device=x.device)
    if not use_triton(x):
        return gated_residual_reference(x, y, gate, fork, channels, rho, token_start, token_mask)

    if fork is None:
        # Two distinct empty tensors (dynamo refuses one tensor passed as two Function inputs).
        fork_idx = torch.zeros(0, dtype=torch.long, device=x.device)
        channels = torch.zeros(0, dtype=torch.long, device=x.device)
    else:
        fork_idx = fork.to(x.device).nonzero()[:, 0]  # (n_fork,), in row order
    # A scalar rho stays (1,); the launcher broadcasts it over the fork rows.
    rho = torch.as_tensor(rho, dtype=torch.float32, device=x.device).reshape(-1)
    return GatedResidualFunction.apply(x, y, gate, fork_idx, channels.to(x.device), rho, token_start, token_mask)
