"""The hot path as one graph: no graph break, compiled == eager, no host sync on the GPU.

A graph break or a failed ``fullgraph=True`` is how a host sync or a data-dependent shape
shows on the CPU (``.item()``, ``nonzero()``, boolean indexing, Python branches on values).
"""
import pytest
import torch

import mmdit
from mmdit.branches import Branch, IdentityAttention, SkipLayers
from mmdit.samplers import Guidance, guided_velocity
from helpers import compile_whole, inputs, rel_err, tiny

pytestmark = pytest.mark.slow  # compiles, several processes or subprocesses

REL = 1e-5  # compiled vs eager, fp32, max|a - b| / max|b|
ROWS = {"plain": {}, "fork": {"fork": slice(1, 3)}, "disrupt": {"disrupt": slice(2, 3)},
        "dg_slg_pag": {"fork": slice(2, 3), "branches": (Branch(slice(2, 3), SkipLayers((0, 2))),
                                                         Branch(slice(2, 3), IdentityAttention((1,))))}}
FAMILIES = ["sd3", "flux"]



def with_spec(family):
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1, rho=lambda s: 0.5 * s)  # per-row rho: a tensor
    return model


def step_inputs(model, B=2, seed=2):
    """x and cond / uncond for a CFG+DG step of ``model``; FLUX-dev's distilled guidance."""
    x, _, ctx, pooled, _ = inputs(model, B=2 * B, seed=seed)
    cond = {"context": ctx[:B], "pooled": pooled[:B]}
    uncond = {"context": ctx[B:], "pooled": pooled[B:]}
    return x[:B], cond, uncond, 3.5 if model.config.family == "flux" else None


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_one_graph_and_compiles_fullgraph(family, rows):
    model = with_spec(family)
    x, sigma, ctx, pooled, g = inputs(model)
    kw = dict(guidance=g, **ROWS[rows])
    with torch.no_grad():
        assert rel_err(compile_whole(model, x, sigma, ctx, pooled, **kw), model(x, sigma, ctx, pooled, **kw)) <= REL


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_dg_step_is_one_graph_and_compiled_matches_eager(family):
    """The whole guided step (batch assembly, one model call with the DG fork and the SLG and
    PAG branches, the guidance combination) traces as one graph that equals eager. Inductor's
    C++ for such steps (a cold compile is half a minute per family here) is checked once per
    family elsewhere: FLUX.1 CFG+DG in test_cache.py (with a step cache), the SD3-family tiny
    model in test_cli.py (``generate --compile``), both in the GPU check's smoke step."""
    model = with_spec(family)
    x, cond, uncond, flux_g = step_inputs(model)
    rule = Guidance(cfg=4.0, dg=2.0, slg=2.5, slg_layers=(2,), pag=1.0, pag_layers=(1,))

    def step(x):
        return guided_velocity(model, x, 0.7, cond, uncond, rule, flux_g)[0]

    with torch.no_grad():
        eager = step(x)
        compiled = compile_whole(step, x)
    assert rel_err(compiled, eager) <= REL


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_path_is_one_graph(monkeypatch, family):
    """With the Triton kernels (interpreted here) the fork block still traces as one graph."""
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    model = with_spec(family)
    x, sigma, ctx, pooled, g = inputs(model, B=2, H=4, W=6)
    kw = dict(guidance=g, fork=slice(1, 2))
    compiled = compile_whole(model, x, sigma, ctx, pooled, **kw)  # with grad: the kernels' autograd traced too
    with torch.no_grad():
        assert rel_err(compiled, model(x, sigma, ctx, pooled, **kw)) <= REL


def test_bool_masks_equal_static_rows():
    """The public (B,) bool masks still work (read once), and give what the slices give."""
    model = with_spec("sd3")
    x, sigma, ctx, pooled, _ = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, ctx, pooled, fork=torch.tensor([False, True, True])),
                           model(x, sigma, ctx, pooled, fork=slice(1, None)))
        assert torch.equal(model(x, sigma, ctx, pooled, disrupt=[False, False, True]),
                           model(x, sigma, ctx, pooled, disrupt=slice(2, 3)))
    with pytest.raises(ValueError, match="contiguous"):
        model(x, sigma, ctx, pooled, fork=slice(0, 3, 2))
    with pytest.raises(ValueError, match=r"\(3,\) bool mask or a slice"):
        model(x, sigma, ctx, pooled, fork=torch.tensor([0, 1, 1]))


# ---- GPU: no host sync in eager, CUDA graph capture of the compiled step --------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_step_has_no_host_sync_and_captures_as_cuda_graph(family):
    model = with_spec(family).cuda().to(torch.bfloat16)
    x, cond, uncond, flux_g = step_inputs(model)
    x = x.cuda().bfloat16()
    cond, uncond = ({k: v.cuda().bfloat16() for k, v in c.items()} for c in (cond, uncond))
    rule = Guidance(cfg=4.0, dg=2.0)

    def step(x):
        return guided_velocity(model, x, 0.7, cond, uncond, rule, flux_g)[0]

    with torch.no_grad():
        eager = step(x)  # warm: the first call may sync (lazy init, Triton compiles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch._dynamo.reset()
        graphed = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # record, then replay the CUDA graph
            out = graphed(x)
    assert rel_err(out.float(), eager.float()) <= 2e-2  # bf16


@pytest.mark.parametrize("family", FAMILIES)
def test_regional_compile_equals_eager_with_the_fork_and_branches(family):
    """``compile="regional"``: every block compiled in place; the fork, SLG and PAG rows still work
    and the output equals the eager model's."""
    from mmdit.compiled import compile_mode, compile_regional

    model = with_spec(family)
    x, sigma, ctx, pooled, g = inputs(model)
    kw = dict(guidance=g, **ROWS["dg_slg_pag"])
    with torch.no_grad():
        eager = model(x, sigma, ctx, pooled, **kw)
        torch._dynamo.reset()
        compile_regional(model, backend="aot_eager")
        assert rel_err(model(x, sigma, ctx, pooled, **kw), eager) <= REL
    with pytest.raises(ValueError, match="compile must be False, True or 'regional'"):
        compile_mode("blocks")


def test_compiled_wrapper_keys_calls_with_branches_on_this_python():
    """Slices hash only from Python 3.12: the wrapper's per-shape key must not hash a Branch's slice."""
    from mmdit.compiled import CompiledTransformer

    model = with_spec("sd3")
    x, sigma, ctx, pooled, g = inputs(model)
    compiled = CompiledTransformer(model, cuda_graphs=False, backend="aot_eager")
    kw = ROWS["dg_slg_pag"]
    with torch.no_grad():
        assert rel_err(compiled(x, sigma, ctx, pooled, **kw), model(x, sigma, ctx, pooled, **kw)) <= REL
        compiled(x, sigma, ctx, pooled, **kw)
    assert len(compiled.shapes) == 1
