"""Fused kernels against independent float64 formulas written here (not the references).

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest), so
shapes stay small and odd: D=80 pads to BLOCK_D=128, N=37 splits into uneven row chunks.
GPU tests (bf16, torch.compile) use the rule max|kernel - ref32| <= 2 max|torch_lowp - ref32| + atol.
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmdit.kernels import dispatch, gated_residual, norm_modulate, qk_norm_rope
from mmdit.kernels.gated_residual import gated_residual_reference
from mmdit.kernels.norm_modulate import norm_modulate_reference
from mmdit.kernels.qk_norm_rope import qk_norm_rope_reference

EPS = 1e-6
# The package exports a function named like this module, so fetch the module itself.
qk_mod = importlib.import_module("mmdit.kernels.qk_norm_rope")
RTOL = 1e-5  # fp32 kernels vs the float64 formula: max|a - b| <= RTOL * max|b|


# ---- independent formulas (float64) ---------------------------------------------------------
def modulate_formula(x, shift, scale):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_formula(x, y, gate, fork_rows=0, append=True, channels=(), rho=0.0, token_range=None,
                           token_mask=None, fork_start=None):
    """fork_rows rows from fork_start (default: the last) copied (append) or replaced,
    channels x chosen tokens times rho."""
    out = x + gate.unsqueeze(1) * y
    if fork_rows == 0:
        return out
    B, N, D = x.shape
    lo, hi = token_range or (0, N)
    M = 0 if token_mask is None else len(token_mask)
    start = B - fork_rows if fork_start is None else fork_start
    copies = []
    for i, b in enumerate(range(start, start + fork_rows)):
        r = float(rho[i]) if torch.is_tensor(rho) else float(rho)
        factor = torch.ones(N, D, dtype=out.dtype)
        for n in range(lo, hi):
            if n < N - M or token_mask[n - (N - M)]:
                for c in channels:
                    factor[n, int(c)] = r
        copies.append(out[b] * factor)
    copies = torch.stack(copies)
    return torch.cat([out, copies] if append else [out[:start], copies, out[start + fork_rows:]])


def table(channels, D):
    """The (D,) bool channel table the kernels take."""
    t = torch.zeros(D, dtype=torch.bool)
    t[list(channels)] = True
    return t


def qk_formula(t, w, cos=None, sin=None):
    """(B, L, H, Dh) -> (B, H, L, Dh); RoPE as a complex multiplication of (t[2j] + i t[2j+1])."""
    u = t / torch.sqrt((t * t).mean(-1, keepdim=True) + EPS) * w
    if cos is not None:
        z = torch.view_as_complex(u.reshape(*u.shape[:-1], -1, 2).contiguous())
        z = z * torch.complex(cos, sin)[None, :, None]
        u = torch.view_as_real(z).flatten(-2)
    return u.permute(0, 2, 1, 3)


# ---- helpers -------------------------------------------------------------------------------
def leaf(t):
    return t.detach().requires_grad_()


def grads_of(fn, inputs, cotangents):
    """Outputs of fn(*inputs) and d(sum out * cotangent)/d inputs."""
    inputs = [leaf(t) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return [o.detach() for o in outs], [t.grad for t in inputs]


def assert_rel(actual, expected, rtol=RTOL, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max|err| {err:.3g} > {rtol:g} * max|ref| {scale:.3g}"


def check(fn, formula, inputs, cotangents, rtol=RTOL):
    """fn on fp32 inputs vs formula on their float64 copies, outputs and gradients."""
    outs, grads = grads_of(fn, inputs, cotangents)
    ref_outs, ref_grads = grads_of(formula, [t.double() for t in inputs], [c.double() for c in cotangents])
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_rel(a, b, rtol, f"output {i}")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a is not None, f"no gradient for input {i}"
        assert_rel(a, b, rtol, f"grad of input {i}")


def strided(shape, gen):
    """A non-contiguous fp32 tensor of ``shape`` (every other element of the last dim)."""
    return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]


@pytest.fixture(params=["reference", "triton"])
def impl(request, monkeypatch):
    """'reference': the *_reference functions; 'triton': the public ops forced onto Triton."""
    monkeypatch.setenv("MMDIT_KERNELS", "triton" if request.param == "triton" else "torch")
    return request.param


# ---- norm_modulate ------------------------------------------------------------------------------
def test_modulate(impl):
    g = torch.Generator().manual_seed(0)
    B, N, D = 3, 37, 80
    x = torch.randn(B, D, N, generator=g).transpose(1, 2)  # (B, N, D), non-contiguous
    mod = torch.randn(B, 6 * D, generator=g)
    shift, scale = mod[:, :D], mod[:, 3 * D:4 * D]  # chunks of an adaLN output: strided rows
    dout = torch.randn(N, B, D, generator=g).transpose(0, 1)
    fn = norm_modulate_reference if impl == "reference" else norm_modulate
    check(fn, modulate_formula, [x, shift, scale], [dout])


# ---- gated residual ------------------------------------------------------------------------
FORKS = {
    "plain": dict(),
    "copy": dict(fork_rows=1),
    "rho0": dict(fork_rows=2, channels=[5, 79, 3]),
    "rho_range": dict(fork_rows=1, channels=[0, 41], rho=0.37, token_range=(9, 30)),
    "rho_per_row_mask": dict(fork_rows=2, channels=[7, 64], rho=[0.5, -2.0], token_range=(4, 37), token_mask=33),
    "in_place_mask": dict(fork_rows=2, append=False, channels=[1, 2, 60], rho=0.25, token_mask=20),
    "middle_row": dict(fork_rows=1, fork_start=1, channels=[4, 8], rho=[0.3]),  # [u | c | branch]: c forks
    "first_rows_in_place": dict(fork_rows=2, fork_start=0, append=False, channels=[9], rho=-1.5),
}


@pytest.mark.parametrize("case", FORKS)
def test_gated_residual(impl, case):
    g = torch.Generator().manual_seed(1)
    B, N, D = 3, 37, 80
    kw = dict(FORKS[case])
    if isinstance(kw.get("rho"), list):
        kw["rho"] = torch.tensor(kw["rho"])
    if "token_mask" in kw:
        kw["token_mask"] = torch.rand(kw["token_mask"], generator=g) > 0.4
    x = torch.randn(B, N, D, generator=g)
    y = strided((B, N, D), g)
    gate = torch.randn(B, 6 * D, generator=g)[:, 2 * D:3 * D]
    rows = B + kw.get("fork_rows", 0) * kw.get("append", True)
    dout = torch.randn(rows, N, D, generator=g)

    fn = gated_residual_reference if impl == "reference" else gated_residual
    fn_kw = dict(kw, channels=table(kw["channels"], D)) if "channels" in kw else kw
    check(lambda *t: fn(*t, **fn_kw), lambda *t: gated_residual_formula(*t, **kw), [x, y, gate], [dout])


def test_gated_residual_fork_rho_one_is_a_copy(monkeypatch):
    """rho = 1 gives bit-identical copies of the forked rows (the fork starts from the rounded sum)."""
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 33, generator=g), torch.randn(2, 5, 33, generator=g)
    gate = torch.randn(2, 33, generator=g)
    out = gated_residual(x, y, gate, 1, channels=torch.ones(33, dtype=torch.bool), rho=1.0)
    assert torch.equal(out[2], out[1])


# ---- qk norm + rope ------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [False, True], ids=["norm", "rope"])
def test_qk_norm_rope(impl, rope):
    g = torch.Generator().manual_seed(3)
    B, L, H, Dh = 2, 13, 3, 24
    qkv = torch.randn(B, L, 3 * H * Dh, generator=g)
    qw, kw = 1 + 0.3 * torch.randn(Dh, generator=g), 1 + 0.3 * torch.randn(Dh, generator=g)
    angle = torch.randn(L, Dh // 2, generator=g)
    cos, sin = (angle.cos(), angle.sin()) if rope else (None, None)
    dq, dk = torch.randn(B, H, L, Dh, generator=g), torch.randn(B, L, H, Dh, generator=g).transpose(1, 2)

    base = qk_norm_rope_reference if impl == "reference" else qk_norm_rope

    def fn(qkv, qw, kw):
        q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)  # strided views of the fused projection
        q_out, k_out = base(q, k, qw, kw, cos, sin)
        assert q_out.is_contiguous() and k_out.is_contiguous()
        return q_out, k_out

    def formula(qkv, qw, kw):
        q, k, _ = qkv.view(B, L, 3, H, Dh).unbind(2)
        c, s = (cos.double(), sin.double()) if rope else (None, None)
        return qk_formula(q, qw, c, s), qk_formula(k, kw, c, s)

    check(fn, formula, [qkv, qw, kw], [dq, dk])


# ---- reduction grids, dispatch, low precision, compile --------------------------------------
@pytest.mark.parametrize("programs", [1, 7])
def test_reduction_grids(monkeypatch, programs):
    """Weight / gate / shift grads are per-program partial sums: vary how many programs."""
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    for module in (dispatch, qk_mod):  # norm_modulate / gated_residual size their grids in dispatch
        monkeypatch.setattr(module, "num_programs", lambda device: programs)
    g = torch.Generator().manual_seed(4)
    B, N, D = 3, 11, 24
    x, shift, scale = torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    check(norm_modulate, modulate_formula, [x, shift, scale], [torch.randn(B, N, D, generator=g)])
    fork = dict(fork_rows=2, rho=0.25)
    check(lambda *t: gated_residual(*t, **fork, channels=table([3], D)),
          lambda *t: gated_residual_formula(*t, **fork, channels=[3]),
          [x, torch.randn(B, N, D, generator=g), scale], [torch.randn(B + 2, N, D, generator=g)])
    q, k, w = torch.randn(2, 45, 5, 16, generator=g), torch.randn(2, 45, 5, 16, generator=g), torch.randn(16, generator=g)
    check(lambda q, k, w: qk_norm_rope(q, k, w, w * 2), lambda q, k, w: (qk_formula(q, w), qk_formula(k, w * 2)),
          [q, k, w], [torch.randn(2, 5, 45, 16, generator=g), torch.randn(2, 5, 45, 16, generator=g)])


def test_dispatch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("MMDIT_KERNELS", raising=False)
    assert dispatch.use_triton(x) == x.is_cuda
    monkeypatch.setenv("MMDIT_KERNELS", "torch")
    assert not dispatch.use_triton(x)
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    assert dispatch.use_triton(x)
    monkeypatch.setenv("MMDIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MMDIT_KERNELS"):
        dispatch.use_triton(x)


def test_checkout_folder_imported_as_kernels_is_mmdit_kernels(monkeypatch):
    """transformers probes for Hugging Face's ``kernels`` package with import_module("kernels"),
    which from a checkout's root finds this folder. It must get mmdit.kernels back: a second
    copy would re-register the mmdit:: custom ops, and torch then frees the first ones."""
    from torch._library.custom_ops import OPDEF_TO_LIB

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    registered = {name: lib for name, lib in OPDEF_TO_LIB.items() if name.startswith("mmdit::")}
    assert len(registered) == 6, sorted(registered)

    assert importlib.import_module("kernels") is importlib.import_module("mmdit.kernels")
    with pytest.raises(ImportError, match="import mmdit.kernels instead"):
        importlib.import_module("kernels.qk_norm_rope")
    now = {name: lib for name, lib in OPDEF_TO_LIB.items() if name.startswith("mmdit::")}
    assert all(now[name] is lib for name, lib in registered.items()), "an mmdit:: op was registered again"

    monkeypatch.setenv("MMDIT_KERNELS", "triton")  # the ops still run, forward and backward
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    q_out, k_out = qk_norm_rope(q, q.detach(), torch.ones(8), torch.ones(8))
    q_out.sum().backward()
    assert torch.allclose(q_out, qk_formula(q.detach().double(), torch.ones(8)).float(), atol=1e-5)


# ---- low precision (rule of STYLE.md) ------------------------------------------------------
def lowp_check(fn, ref, inputs, cotangents, dtype, atol_frac=1e-3):
    """max|fn(lowp) - ref(fp32)| <= 2 max|ref(lowp) - ref(fp32)| + atol, outputs and grads;
    atol = atol_frac * max|ref(fp32)|. Inputs are rounded to dtype first, so all three see
    the same values."""
    lowp = [t.to(dtype) for t in inputs]
    outs, grads = grads_of(fn, lowp, [c.to(dtype) for c in cotangents])
    t_outs, t_grads = grads_of(ref, lowp, [c.to(dtype) for c in cotangents])
    r_outs, r_grads = grads_of(ref, [t.float() for t in lowp], [c.to(dtype).float() for c in cotangents])
    pairs = [("output", a, b, c) for a, b, c in zip(outs, t_outs, r_outs)]
    pairs += [("grad", a, b, c) for a, b, c in zip(grads, t_grads, r_grads)]
    for i, (what, kernel, torch_lowp, ref32) in enumerate(pairs):
        assert kernel.dtype == dtype, (what, i, kernel.dtype)
        err = (kernel.float() - ref32).abs().max().item()
        bound = 2 * (torch_lowp.float() - ref32).abs().max().item() + atol_frac * ref32.abs().max().item()
        assert err <= bound, f"{what} {i} ({dtype}): max|kernel - ref32| {err:.3g} > {bound:.3g}"


def lowp_cases(device, B, N, D, H, Dh, gen):
    """(name, kernel fn, reference fn, fp32 inputs, cotangents) for the three ops."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    fork = dict(fork_rows=1, channels=table([1, D - 2], D).to(device), rho=0.5, token_range=(1, N))
    angle = rand(N, Dh // 2)
    cos, sin = angle.cos(), angle.sin()

    def qk(fn):
        def run(qkv, qw, kw):
            q, k, _ = qkv.view(B, N, 3, H, Dh).unbind(2)
            return fn(q, k, qw, kw, cos, sin)
        return run

    return [
        ("norm_modulate", norm_modulate, norm_modulate_reference, [rand(B, N, D), rand(B, D), rand(B, D)], [rand(B, N, D)]),
        ("gated_residual", lambda *t: gated_residual(*t, **fork), lambda *t: gated_residual_reference(*t, **fork),
         [rand(B, N, D), rand(B, N, D), rand(B, D)], [rand(B + 1, N, D)]),
        ("qk_norm_rope", qk(qk_norm_rope), qk(qk_norm_rope_reference),
         [rand(B, N, 3 * H * Dh), 1 + 0.2 * rand(Dh), 1 + 0.2 * rand(Dh)], [rand(B, H, N, Dh), rand(B, H, N, Dh)]),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_interpreter(monkeypatch, dtype):
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    for name, fn, ref, inputs, cotangents in lowp_cases("cpu", 2, 9, 40, 2, 8, torch.Generator().manual_seed(5)):
        lowp_check(fn, ref, inputs, cotangents, dtype)


# ---- torch.compile -------------------------------------------------------------------------
def mini_block(x, mod, wqkv, qw, kw, cos, sin, channels, rho, H=2):
    """One attention half-block built from the three ops (the fork included)."""
    B, N, D = x.shape
    shift, scale, gate = mod.chunk(3, dim=1)  # (B, D) each
    q, k, v = (norm_modulate(x, shift, scale) @ wqkv).view(B, N, 3, H, D // H).unbind(2)
    q, k = qk_norm_rope(q, k, qw, kw, cos, sin)  # (B, H, N, Dh)
    a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2)).transpose(1, 2).reshape(B, N, D)
    return gated_residual(x, a, gate, 2, channels=channels, rho=rho, token_range=(2, N))


def compile_check(device, compiler):
    g = torch.Generator().manual_seed(6)
    B, N, D, H = 3, 7, 16, 2
    angle = torch.randn(N, D // H // 2, generator=g).to(device)
    fixed = dict(cos=angle.cos(), sin=angle.sin(), channels=table([0, 5], D).to(device),
                 rho=torch.tensor([0.0, 0.5], device=device))
    inputs = [torch.randn(B, N, D, generator=g), torch.randn(B, 3 * D, generator=g),
              torch.randn(D, 3 * D, generator=g) / 4, torch.randn(D // H, generator=g), torch.randn(D // H, generator=g)]
    inputs = [t.to(device) for t in inputs]
    dout = [torch.randn(B + 2, N, D, generator=g).to(device)]
    outs, grads = grads_of(lambda *t: mini_block(*t, **fixed), inputs, dout)
    compiled = torch.compile(mini_block, fullgraph=True, backend=compiler)
    c_outs, c_grads = grads_of(lambda *t: compiled(*t, **fixed), inputs, dout)
    for a, b in zip(c_outs + c_grads, outs + grads):
        assert_rel(a, b, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(monkeypatch, backend):
    """No graph break in a block (fork included), forward and backward; aot_eager keeps the
    CPU test fast (inductor runs in the GPU test)."""
    monkeypatch.setenv("MMDIT_KERNELS", backend)
    torch._dynamo.reset()
    compile_check("cpu", "aot_eager")


# ---- GPU: bf16, eager and torch.compile (inductor) -----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("Dh", [64, 128])
def test_gpu_bf16(monkeypatch, compiled, Dh):
    monkeypatch.delenv("MMDIT_KERNELS", raising=False)
    assert dispatch.use_triton(torch.zeros(1, device="cuda"))
    torch._dynamo.reset()
    H = 1536 // Dh
    for name, fn, ref, inputs, cotangents in lowp_cases("cuda", 3, 333, H * Dh - 7, H, Dh, torch.Generator().manual_seed(7)):
        if compiled:
            fn = torch.compile(fn, fullgraph=True)
        lowp_check(fn, ref, inputs, cotangents, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_compile_block(monkeypatch):
    monkeypatch.delenv("MMDIT_KERNELS", raising=False)
    torch._dynamo.reset()
    compile_check("cuda", "inductor")
