"""Step caching (mmdit.models.cache): threshold 0 changes nothing, a skipping run equals a cached
trajectory computed by hand, every row keeps its own residual (DG's fork rows their own), the state
lives for one call, and the cached step is one graph."""
import pytest
import torch

import mmdit
from helpers import compile_whole, inputs, rel_err, tiny
from mmdit.models.cache import FirstBlockCache, TeaCache, parse
from mmdit.samplers import Guidance, guided_velocity, sample, sd3_sigmas

ALL = 1e9  # a threshold under which every change falls: every step that may skip does
STEPS = 6
EXACT = 0.0  # threshold 0: the same operations, bit for bit
REL = 1e-5  # fp32, the same arithmetic in another order


def setup(family, B=1, seed=1):
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    x, _, ctx, pooled, g = inputs(model, B=2 * B, seed=seed)
    cond = {"context": ctx[:B], "pooled": pooled[:B]}
    uncond = {"context": ctx[B:], "pooled": pooled[B:]}
    return model, x[:B], cond, uncond, (None if g is None else 3.5)


GUIDES = {"cfg": Guidance(cfg=3.0), "cfg_dg_slg_pag": Guidance(cfg=3.0, dg=1.5, slg=1.0, slg_layers=(2,), pag=0.5,
                                                               pag_layers=(1,))}


@pytest.mark.parametrize("spec", ["fbcache:0", "teacache:0", "fbcache:0:first=2:last=1"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_threshold_zero_changes_nothing(family, spec):
    model, x, cond, uncond, g = setup(family)
    for guide in GUIDES.values():
        plain = sample(model, x, sd3_sigmas(STEPS), cond, uncond, guide=guide, guidance=g)
        cached = sample(model, x, sd3_sigmas(STEPS), cond, uncond, guide=guide, guidance=g, cache=spec)
        assert torch.equal(plain, cached)


def hand_cached(model, x, sigmas, cond, uncond, guide, g, first: int):
    """FirstBlockCache skipping every step it may, written out: step 0 computes and records, per row,
    what the middle blocks (first..end) added; steps 1..n-2 run the first blocks, add that, and run no
    other block; the last step computes. SD3, CFG only (no rows are born in the middle)."""
    blocks = list(model.joint_blocks)
    seen = {}

    def record(i):
        def hook(module, args, kwargs, out):
            seen[i] = out
        return hook

    handles = [blocks[first - 1].register_forward_hook(record(first - 1), with_kwargs=True),
               blocks[-1].register_forward_hook(record(len(blocks) - 1), with_kwargs=True)]
    sigmas = sigmas.tolist()
    with torch.no_grad():
        v = guided_velocity(model, x, sigmas[0], cond, uncond, guide, g)[0]
        for h in handles:
            h.remove()
        (ctx_head, img_head), (_, img_end) = seen[first - 1], seen[len(blocks) - 1]
        residual = img_end - img_head  # the text stream ends at the last block (SD3): only the image's
        x = x + (sigmas[1] - sigmas[0]) * v
        originals = [b.forward for b in blocks]
        for i in range(first, len(blocks)):
            last = i == len(blocks) - 1
            blocks[i].forward = (lambda ctx, img, c, rows=None, last=last:
                                 (None, img + residual) if last else (ctx, img))
        for k in range(1, len(sigmas) - 2):
            v = guided_velocity(model, x, sigmas[k], cond, uncond, guide, g)[0]
            x = x + (sigmas[k + 1] - sigmas[k]) * v
        for b, f in zip(blocks, originals):
            b.forward = f
        v = guided_velocity(model, x, sigmas[-2], cond, uncond, guide, g)[0]
        return x + (sigmas[-1] - sigmas[-2]) * v


@pytest.mark.parametrize("first", [1, 2])
def test_skipping_every_step_it_may_equals_the_cached_trajectory_by_hand(first):
    model, x, cond, uncond, g = setup("sd3", B=2)
    sigmas = sd3_sigmas(STEPS)
    ours = sample(model, x, sigmas, cond, uncond, guide=GUIDES["cfg"], cache=FirstBlockCache(ALL, first=first))
    ref = hand_cached(model, x, sigmas, cond, uncond, GUIDES["cfg"], g, first)
    assert rel_err(ours, ref) <= REL
    plain = sample(model, x, sigmas, cond, uncond, guide=GUIDES["cfg"])
    assert rel_err(ours, plain) > 1e-3  # it did skip


@pytest.mark.parametrize("policy", [FirstBlockCache(ALL), TeaCache(ALL)])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rows_keep_their_own_residual_and_calls_share_nothing(family, policy):
    """A batch of two prompts equals each prompt alone (every skippable step skipped in both), and a
    second call equals the first: no state outlives a call."""
    model, x, cond, uncond, g = setup(family, B=2)
    guide, sigmas = GUIDES["cfg_dg_slg_pag"], sd3_sigmas(STEPS)
    both = sample(model, x, sigmas, cond, uncond, guide=guide, guidance=g, cache=policy)
    for r in range(2):
        alone = sample(model, x[r:r + 1], sigmas, {k: v[r:r + 1] for k, v in cond.items()},
                       {k: v[r:r + 1] for k, v in uncond.items()}, guide=guide, guidance=g, cache=policy)
        assert rel_err(both[r:r + 1], alone) <= REL
    assert torch.equal(sample(model, x, sigmas, cond, uncond, guide=guide, guidance=g, cache=policy), both)


def test_the_fork_rows_keep_the_forks_own_residual_and_the_call_keeps_its_rows():
    family = "flux"
    model, x, cond, uncond, g = setup(family)
    sigmas = sd3_sigmas(STEPS).tolist()
    state = FirstBlockCache(ALL, first=1).start(sigmas, family)
    calls = []

    def counted(*args, **kw):
        calls.append(args[0].shape[0])
        return model(*args, **kw)

    counted.velocity = model.velocity
    with torch.no_grad():
        for s in sigmas[:3]:  # a computed step, then two skipped ones
            state.at(s)
            v, rows = guided_velocity(counted, x, s, cond, uncond, GUIDES["cfg_dg_slg_pag"], g, cache=state)
            assert rows == 5 and torch.isfinite(v).all()  # [uncond | cond | dg | slg | pag], one call a step
    assert calls == [2, 2, 2] and state.skipped_steps() == 2
    # the single blocks' span (2, 4): rows [uncond, cond | pag | dg | slg], born in that order in the middle
    layout, residual = state.residuals[(2, 4)]
    assert [j for j, _ in layout] == [None, 2, 0, 1]  # branches: 0 DG's fork, 1 SLG, 2 PAG
    joint = residual[-1]
    assert joint.shape[0] == 5 and rel_err(joint[3], joint[1]) > 1e-3  # the fork's residual is its own


def test_specs_and_errors():
    assert parse("fbcache:0.08") == FirstBlockCache(0.08)
    assert parse("teacache:0.4:first=1:last=2") == TeaCache(0.4, first=1, last=2)
    assert parse(None) is None and parse("none") is None
    with pytest.raises(ValueError, match="POLICY:THRESHOLD"):
        parse("fastcache:1")
    with pytest.raises(ValueError, match="unknown option"):
        parse("fbcache:0.1:middle=2")
    with pytest.raises(ValueError, match="first >= 1"):
        FirstBlockCache(0.1, first=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [FirstBlockCache(ALL), TeaCache(ALL)])
def test_a_cached_step_is_one_graph_and_compiles_to_the_eager_numbers(policy):
    model, x, cond, uncond, g = setup("flux")
    sigmas = sd3_sigmas(STEPS).tolist()
    guide = GUIDES["cfg_dg_slg_pag"]
    eager, compiled_state = policy.start(sigmas, "flux"), policy.start(sigmas, "flux")
    with torch.no_grad():
        for state in (eager, compiled_state):  # a computed first step fills the residuals
            state.at(sigmas[0])
            guided_velocity(model, x, sigmas[0], cond, uncond, guide, g, cache=state)
        eager.at(sigmas[1])
        want = guided_velocity(model, x, sigmas[1], cond, uncond, guide, g, cache=eager)[0]

        def step(x):
            return guided_velocity(model, x, sigmas[1], cond, uncond, guide, g, cache=compiled_state)[0]

        compiled_state.at(sigmas[1])
        got = compile_whole(step, x)
    assert rel_err(got, want) <= REL


def cached_step(device="cpu", dtype=torch.float32):
    """A FLUX CFG+DG step whose middle blocks are skipped (the first step computed the residuals)."""
    model, x, cond, uncond, g = setup("flux")
    model = model.to(device, dtype)
    x = x.to(device, dtype)
    cond, uncond = ({k: v.to(device, dtype) for k, v in c.items()} for c in (cond, uncond))
    sigmas = sd3_sigmas(STEPS).tolist()
    guide = Guidance(cfg=3.0, dg=1.5)
    state = FirstBlockCache(ALL).start(sigmas, "flux")
    with torch.no_grad():
        state.at(sigmas[0])
        guided_velocity(model, x, sigmas[0], cond, uncond, guide, g, cache=state)
        state.at(sigmas[1])
        want = guided_velocity(model, x, sigmas[1], cond, uncond, guide, g, cache=state)[0]

    def step(x):
        return guided_velocity(model, x, sigmas[1], cond, uncond, guide, g, cache=state)[0]

    return step, x, want


@pytest.mark.slow
def test_inductor_reads_each_cached_stacks_decision_on_the_host():
    """What docs/guidance.md says: inductor lowers the cache's torch.cond to a host-side
    ``if pred.item():`` (one read per block stack; FLUX has two), and skips CUDA graphs for that graph."""
    from torch._inductor.utils import run_and_get_code

    step, x, want = cached_step()
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(step, fullgraph=True), x)
    reads = sum(line.strip().startswith("if ") and line.strip().endswith(".item():")
                for source in code for line in source.splitlines())
    assert reads == 2
    assert rel_err(got, want) <= REL


@pytest.mark.gpu
def test_gpu_cached_step_under_cuda_graphs():
    """The cached step as a CUDA graph: ``backend="cudagraphs"`` captures the torch.cond as a
    conditional node (no host read when replayed); inductor's reduce-overhead gives the same
    numbers without a CUDA graph for this graph (its cond reads the decision on the host)."""
    from torch._dynamo.utils import counters

    step, x, want = cached_step("cuda", torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        graphed = torch.compile(step, fullgraph=True, backend="cudagraphs")
        for _ in range(3):  # warm up, record, replay
            out = graphed(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = graphed(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert rel_err(out.float(), want.float()) <= 2e-2  # bf16
        torch._dynamo.reset()
        counters.clear()
        inductor = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            out = inductor(x)
        assert rel_err(out.float(), want.float()) <= 2e-2
        print(f"\ninductor reduce-overhead: {counters['inductor']['cudagraph_skips']} CUDA graph(s) skipped")
