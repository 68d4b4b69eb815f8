"""Per-head RMSNorm of q and k, optionally followed by interleaved RoPE (FLUX).

For each row t = x[b, l, h, :] of q or k (Dh values), with weight w (Dh,):

    u = t * rstd * w,   rstd = 1 / sqrt(sum_d t_d^2 / Dh + eps)
    out[b, h, l, 2j]     = u[2j] * cos[l, j] - u[2j+1] * sin[l, j]      (RoPE, else out = u)
    out[b, h, l, 2j + 1] = u[2j] * sin[l, j] + u[2j+1] * cos[l, j]

Backward (g = dL/dout; RoPE is a rotation, so its transpose un-rotates g first):

    gu[2j] = g[2j] cos + g[2j+1] sin,   gu[2j+1] = -g[2j] sin + g[2j+1] cos
    dw = sum_rows gu * that,   dt = rstd * (gu * w - that * mean_d(gu * w * that)),   that = t * rstd

q and k arrive as (B, L, H, Dh) views of the fused qkv output (any strides) and leave as
contiguous (B, H, L, Dh) for SDPA: the transpose is folded into the store. Precision: loads
upcast to fp32, statistics / weight / rotation in fp32, one rounding at the store; dw is an
fp32 partial sum per program, summed by torch.
"""
import torch

from .dispatch import block_size, kernel_op, launch, num_programs, num_warps, tl, triton, use_triton

TILE = 2048  # elements per (BLOCK_R, BLOCK_D) tile: a few rows of one head each


@triton.jit
def _rows(start, n_rows, L, H, BLOCK_R: tl.constexpr):
    """Row indices of one tile, in output (b, h, l) order, and their (b, l, h) coordinates."""
    rows = start + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < n_rows, rows // (H * L), rows % L, (rows // L) % H


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, l, row_mask, Dh, stride_cos_l, stride_cos_d, stride_sin_l, stride_sin_d,
                  BLOCK_D: tl.constexpr):
    j = tl.arange(0, BLOCK_D // 2)
    mask = row_mask[:, None] & (j < Dh // 2)[None, :]
    c = tl.load(cos_ptr + l[:, None] * stride_cos_l + j[None, :] * stride_cos_d, mask=mask, other=0.0)
    s = tl.load(sin_ptr + l[:, None] * stride_sin_l + j[None, :] * stride_sin_d, mask=mask, other=0.0)
    return c.to(tl.float32), s.to(tl.float32)


@triton.jit
def _rotate(t, c, s, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate adjacent pairs (t[2j], t[2j+1]) of each row by the angle with cos c, sin s."""
    t0, t1 = tl.split(tl.reshape(t, (BLOCK_R, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(t0 * c - t1 * s, t0 * s + t1 * c), (BLOCK_R, BLOCK_D))


@triton.jit
def _qk_norm_rope_fwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    n_rows, L, H, Dh, eps,
    stride_xb, stride_xl, stride_xh, stride_xd,
    stride_cos_l, stride_cos_d, stride_sin_l, stride_sin_d,
    ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_R consecutive output rows; a row is one head of one token."""
    rows, row_mask, b, l, h = _rows(tl.program_id(0) * BLOCK_R, n_rows, L, H, BLOCK_R)
    offs = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs < Dh)[None, :]

    x_offs = b * stride_xb + l * stride_xl + h * stride_xh
    x = tl.load(x_ptr + x_offs[:, None] + offs[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / Dh + eps)
    w = tl.load(w_ptr + offs, mask=offs < Dh, other=0.0).to(tl.float32)
    out = x * rstd[:, None] * w[None, :]
    if ROPE:
        c, s = _load_cos_sin(cos_ptr, sin_ptr, l, row_mask, Dh, stride_cos_l, stride_cos_d,
                             stride_sin_l, stride_sin_d, BLOCK_D)
        out = _rotate(out, c, s, BLOCK_R, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * Dh + offs[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, dout_ptr, dx_ptr, dw_part_ptr,
    n_rows, L, H, Dh, eps,
    stride_xb, stride_xl, stride_xh, stride_xd,
    stride_gb, stride_gh, stride_gl, stride_gd,
    stride_cos_l, stride_cos_d, stride_sin_l, stride_sin_d,
    ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid-stride loop over row tiles; dx goes out as (B, L, H, Dh) contiguous, and each
    program stores one fp32 partial row of dw."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + offs, mask=offs < Dh, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(pid * BLOCK_R, n_rows, tl.num_programs(0) * BLOCK_R):
        rows, row_mask, b, l, h = _rows(start, n_rows, L, H, BLOCK_R)
        mask = row_mask[:, None] & (offs < Dh)[None, :]

        x_offs = b * stride_xb + l * stride_xl + h * stride_xh
        x = tl.load(x_ptr + x_offs[:, None] + offs[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / Dh + eps)
        xhat = x * rstd[:, None]

        g_offs = b * stride_gb + h * stride_gh + l * stride_gl
        g = tl.load(dout_ptr + g_offs[:, None] + offs[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        if ROPE:  # the transpose of a rotation by a is the rotation by -a
            c, s = _load_cos_sin(cos_ptr, sin_ptr, l, row_mask, Dh, stride_cos_l, stride_cos_d,
                                 stride_sin_l, stride_sin_d, BLOCK_D)
            g = _rotate(g, c, -s, BLOCK_R, BLOCK_D)
        dw += tl.sum(g * xhat, axis=0)
        gw = g * w[None, :]
        dx = rstd[:, None] * (gw - xhat * (tl.sum(gw * xhat, axis=1) / Dh)[:, None])
        dx_offs = ((b * L + l) * H + h) * Dh
        tl.store(dx_ptr + dx_offs[:, None] + offs[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    tl.store(dw_part_ptr + pid * Dh + offs, dw, mask=offs < Dh)


def _tile(Dh, n_rows):
    BLOCK_D = block_size(Dh)
    return max(1, min(TILE // BLOCK_D, block_size(n_rows))), BLOCK_D


def _rope_args(x, cos, sin):
    """cos/sin pointers and strides; with no RoPE, x stands in (never read: ROPE=False)."""
    if cos is None:
        return (x, x, 0, 0, 0, 0)
    return (cos, sin, *cos.stride(), *sin.stride())


def _forward_one(x, w, cos, sin, eps):
    B, L, H, Dh = x.shape
    out = torch.empty((B, H, L, Dh), dtype=x.dtype, device=x.device)
    n_rows = B * H * L
    if out.numel() == 0:
        return out
    BLOCK_R, BLOCK_D = _tile(Dh, n_rows)
    cos_ptr, sin_ptr, *rope_strides = _rope_args(x, cos, sin)
    launch(_qk_norm_rope_fwd_kernel)[(triton.cdiv(n_rows, BLOCK_R),)](
        x, w, cos_ptr, sin_ptr, out, n_rows, L, H, Dh, eps, *x.stride(), *rope_strides,
        ROPE=cos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_R * BLOCK_D),
    )
    return out


def _backward_one(dout, x, w, cos, sin, eps):
    """-> dx (B, L, H, Dh) in x.dtype, dw (Dh,) in fp32."""
    B, L, H, Dh = x.shape
    dx = torch.empty((B, L, H, Dh), dtype=x.dtype, device=x.device)
    n_rows = B * H * L
    BLOCK_R, BLOCK_D = _tile(Dh, n_rows)
    programs = max(1, min(triton.cdiv(n_rows, BLOCK_R), num_programs(x.device)))
    dw_part = torch.zeros((programs, Dh), dtype=torch.float32, device=x.device)
    if dx.numel() > 0:
        cos_ptr, sin_ptr, *rope_strides = _rope_args(x, cos, sin)
        launch(_qk_norm_rope_bwd_kernel)[(programs,)](
            x, w, cos_ptr, sin_ptr, dout, dx, dw_part, n_rows, L, H, Dh, eps,
            *x.stride(), *dout.stride(), *rope_strides,
            ROPE=cos is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=num_warps(BLOCK_R * BLOCK_D),
        )
    return dx, dw_part.sum(0)


def _fwd_fake(q, k, q_weight, k_weight, cos, sin, eps):
    return q.new_empty(q.transpose(1, 2).shape), k.new_empty(k.transpose(1, 2).shape)


@kernel_op("qk_norm_rope", fake=_fwd_fake)
def _qk_norm_rope_fwd(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_one(q, q_weight, cos, sin, eps), _forward_one(k, k_weight, cos, sin, eps)


def _bwd_fake(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps):
    f32 = torch.float32
    return (q.new_empty(q.shape), k.new_empty(k.shape),
            q.new_empty(q_weight.shape, dtype=f32), k.new_empty(k_weight.shape, dtype=f32))


@kernel_op("qk_norm_rope_bwd", fake=_bwd_fake)
def _qk_norm_rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dqw = _backward_one(dq_out, q, q_weight, cos, sin, eps)
    dk, dkw = _backward_one(dk_out, k, k_weight, cos, sin, eps)
    return dq, dk, dqw, dkw


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq_out, dk_out):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dqw, dkw = _qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, ctx.eps)
    return dq, dk, dqw.to(q_weight.dtype), dkw.to(k_weight.dtype), None, None, None


_qk_norm_rope_fwd.register_autograd(_backward, setup_context=_setup)


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos=None, sin=None, eps: float = 1e-6):
    """q, k: (B, L, H, Dh) (any strides); weights: (Dh,); cos, sin: (L, Dh/2) or None.

    Returns q, k as (B, H, L, Dh), RMS statistics in fp32, rotation of adjacent pairs
    ``(x[2j], x[2j+1])`` by the angle whose cos/sin are given.
    """
    def one(t, w):
        tf = t.float()
        tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        if cos is not None:
            t0, t1 = tf[..., 0::2], tf[..., 1::2]  # (B, L, H, Dh/2)
            c, s = cos[None, :, None].float(), sin[None, :, None].float()
            tf = torch.stack([t0 * c - t1 * s, t0 * s + t1 * c], dim=-1).flatten(-2)
        return tf.transpose(1, 2).to(t.dtype).contiguous()  # (B, H, L, Dh)

    return one(q, q_weight), one(k, k_weight)


def qk_norm_rope(q, k, q_weight, k_weight, cos=None, sin=None, eps: float = 1e-6):
    """RMSNorm(q) * q_weight, RMSNorm(k) * k_weight per head, then RoPE if cos/sin are given.

    q, k: (B, L, H, Dh) with any strides -> q, k: (B, H, L, Dh) contiguous.
    """
    B, L, H, Dh = q.shape
    if k.shape != q.shape or q_weight.shape != (Dh,) or k_weight.shape != (Dh,):
        raise ValueError(f"q {tuple(q.shape)} needs k of the same shape and weights ({Dh},), got "
                         f"{tuple(k.shape)} / {tuple(q_weight.shape)} / {tuple(k_weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None and (Dh % 2 or cos.shape != (L, Dh // 2) or sin.shape != (L, Dh // 2)):
        raise ValueError(f"RoPE needs an even Dh and cos/sin of shape {(L, Dh // 2)}, got Dh={Dh}, "
                         f"{tuple(cos.shape)} / {tuple(sin.shape)}")
    if use_triton(q):
        return _qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
