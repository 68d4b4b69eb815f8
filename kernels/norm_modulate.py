"""adaLN's normalise-then-modulate: LayerNorm without affine, then ``* (1 + scale) + shift``.

    out[b, n] = (x[b, n] - mean) * rstd * (1 + scale[b]) + shift[b],
    mean = sum_d x[b, n, d] / D,   rstd = 1 / sqrt(sum_d (x[b, n, d] - mean)^2 / D + eps)

Backward (xhat = (x - mean) * rstd, g = dL/dout, gh = g * (1 + scale[b])):

    dx = rstd * (gh - mean_d(gh) - xhat * mean_d(gh * xhat))
    dshift[b] = sum_n g[b, n],   dscale[b] = sum_n g[b, n] * xhat[b, n]

Precision: every load is upcast to fp32; statistics, the affine part and the reductions are
fp32, and the result is rounded once to x.dtype. mean/rstd are recomputed in the backward
(it reads x anyway) instead of being saved.
"""
import torch
import torch.nn.functional as F

from .dispatch import block_size, kernel_op, launch, num_warps, program_chunk, program_row, row_chunks, tl, triton, use_triton


@triton.jit
def _centre(x, mask, D, eps):
    """x - mean(x) and 1 / std(x) of one fp32 row; two passes (the centred sum avoids
    E[x^2] - E[x]^2 cancellation)."""
    xc = tl.where(mask, x - tl.sum(x, axis=0) / D, 0.0)
    return xc, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)


@triton.jit
def _norm_modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    N, D, eps,
    stride_xb, stride_xn, stride_xd,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    BLOCK_D: tl.constexpr,
):
    """One program per (b, n) row; the row lives in registers (BLOCK_D >= D, masked)."""
    row, b, n, offs, mask = program_row(N, D, BLOCK_D)

    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    xc, rstd = _centre(x, mask, D, eps)

    shift = tl.load(shift_ptr + b * stride_shift_b + offs * stride_shift_d, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scale_b + offs * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * D + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_modulate_bwd_kernel(
    x_ptr, scale_ptr, dout_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    N, D, eps, rows_per_program,
    stride_xb, stride_xn, stride_xd,
    stride_scale_b, stride_scale_d,
    stride_gb, stride_gn, stride_gd,
    BLOCK_D: tl.constexpr,
):
    """Program (b, chunk) walks rows n of one chunk of batch b; it writes dx for each row and
    one fp32 partial sum of dshift / dscale for the chunk (summed over chunks by torch)."""
    b, offs, mask, n_start, n_end, part = program_chunk(N, D, rows_per_program, BLOCK_D)

    scale = tl.load(scale_ptr + b * stride_scale_b + offs * stride_scale_d, mask=mask, other=0.0).to(tl.float32)
    dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(n_start, n_end):
        x = tl.load(x_ptr + b * stride_xb + n * stride_xn + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
        xc, rstd = _centre(x, mask, D, eps)
        xhat = xc * rstd

        g = tl.load(dout_ptr + b * stride_gb + n * stride_gn + offs * stride_gd, mask=mask, other=0.0).to(tl.float32)
        gh = g * (1.0 + scale)
        dx = (gh - tl.sum(gh, axis=0) / D - xhat * (tl.sum(gh * xhat, axis=0) / D)) * rstd
        tl.store(dx_ptr + (b * N + n) * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dshift += g
        dscale += g * xhat

    tl.store(dshift_part_ptr + part + offs, dshift, mask=mask)
    tl.store(dscale_part_ptr + part + offs, dscale, mask=mask)


@kernel_op("norm_modulate", fake=lambda x, shift, scale, eps: x.new_empty(x.shape))
def _norm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    B, N, D = x.shape
    out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BLOCK_D = block_size(D)
    launch(_norm_modulate_fwd_kernel)[(B * N,)](
        x, shift, scale, out, N, D, eps,
        *x.stride(), *shift.stride(), *scale.stride(),
        BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
    )
    return out


def _bwd_fake(dout, x, scale, eps):
    B, N, D = x.shape
    return x.new_empty(x.shape), x.new_empty((B, D), dtype=torch.float32), x.new_empty((B, D), dtype=torch.float32)


@kernel_op("norm_modulate_bwd", fake=_bwd_fake)
def _norm_modulate_bwd(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx (B, N, D) in x.dtype; dshift, dscale (B, D) in fp32."""
    B, N, D = x.shape
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    chunks, rows_per_program = row_chunks(B, N, x.device)
    dshift_part = torch.zeros((B, chunks, D), dtype=torch.float32, device=x.device)
    dscale_part = torch.zeros((B, chunks, D), dtype=torch.float32, device=x.device)
    if dx.numel() > 0:
        BLOCK_D = block_size(D)
        launch(_norm_modulate_bwd_kernel)[(B, chunks)](
            x, scale, dout, dx, dshift_part, dscale_part, N, D, eps, rows_per_program,
            *x.stride(), *scale.stride(), *dout.stride(),
            BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_D),
        )
    return dx, dshift_part.sum(1), dscale_part.sum(1)


def _setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.shift_dtype = eps, shift.dtype


def _backward(ctx, dout):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _norm_modulate_bwd(dout, x, scale, ctx.eps)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_norm_modulate_fwd.register_autograd(_backward, setup_context=_setup)


def norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """x: (B, N, D); shift, scale: (B, D) -> (B, N, D). LayerNorm statistics in fp32."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return torch.addcmul(shift.float()[:, None], h, 1 + scale.float()[:, None]).to(x.dtype)  # one pass


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """``LayerNorm(x) * (1 + scale) + shift``; x: (B, N, D), shift, scale: (B, D) -> (B, N, D)."""
    B, N, D = x.shape
    if shift.shape != (B, D) or scale.shape != (B, D):
        raise ValueError(f"x {tuple(x.shape)} needs shift/scale of shape {(B, D)}, "
                         f"got {tuple(shift.shape)} / {tuple(scale.shape)}")
    if use_triton(x):
        return _norm_modulate_fwd(x, shift, scale, eps)
    return norm_modulate_reference(x, shift, scale, eps)
