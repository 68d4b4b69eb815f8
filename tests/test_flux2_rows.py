"""FLUX.2 rows: DG's fork, SLG and PAG branches equal separate perturbed forwards (with reference
images riding along), and every call traces as one graph (test_fork / test_branches /
test_compile for FLUX.2, whose call has no pooled input and may carry ``refs``)."""
import copy

import pytest
import torch

import mmdit
from mmdit.branches import Branch, IdentityAttention, MADisruption, SkipLayers
from mmdit.models.rows import BlockRows
from mmdit.samplers import Guidance, guided_velocity

from helpers import one_graph
import peers_flux2 as P

TOL = 1e-5  # fp32, the same computation in two arrangements
REL = 1e-5  # compiled vs eager
CHANNELS = (3, 17, 30)
REFS = ((1, 2, 3), (3, 3, 2))  # (rows, h_i, w_i): one shared reference, one per row


def rho(sigma):
    return 0.5 * sigma


def with_spec(block, streams=("image",), guidance=True):
    model = P.tiny(guidance=guidance)
    model.ma = mmdit.MASpec(channels=CHANNELS, block=block, rho=rho, streams=streams)
    return model


def disrupted_by_hook(model, block, streams):
    """A copy of ``model`` (no MA spec) whose block ``block`` output has the MA channels of the
    chosen tokens times rho(sigma) per row, done by a forward hook: the reference for the fork."""
    model = copy.deepcopy(model)
    model.ma = None
    ch = torch.tensor(CHANNELS)
    sigma_now = {}

    def hook(module, args, output):
        r = rho(sigma_now["sigma"])[:, None, None]
        if isinstance(output, tuple):  # double block: (img, txt)
            img, txt = (t.clone() for t in output)
            if "image" in streams:
                img[..., ch] = img[..., ch] * r
            if "text" in streams:
                txt[..., ch] = txt[..., ch] * r
            return img, txt
        out, L = output.clone(), args[4]  # single block: [text ; image], text_len is its 5th input
        lo, hi = (0 if "text" in streams else L), (out.shape[1] if "image" in streams else L)
        out[:, lo:hi, ch] = out[:, lo:hi, ch] * r
        return out

    model.blocks()[block].register_forward_hook(hook)
    return lambda x, sigma, *a, **kw: (sigma_now.update(sigma=sigma), model(x, sigma, *a, **kw))[1]


@pytest.mark.parametrize("block,streams", [(1, ("image",)), (2, ("image",)), (3, ("image", "text")),
                                           (0, ("text",))], ids=["double", "first-single", "last-single-both",
                                                                "double-text"])
def test_fork_equals_a_separate_disrupted_forward(block, streams):
    model = with_spec(block, streams)
    x, sigma, ctx, g, refs = P.tiny_inputs(model, refs=REFS)
    with torch.no_grad():
        plain = model(x, sigma, ctx, guidance=g, refs=refs)
        forked = model(x, sigma, ctx, guidance=g, refs=refs, fork=slice(1, 3))
        inplace = model(x, sigma, ctx, guidance=g, refs=refs, disrupt=slice(0, 3))
        hooked = disrupted_by_hook(model, block, streams)(x, sigma, ctx, guidance=g, refs=refs)
    assert forked.shape[0] == 5
    assert P.rel(forked[:3], plain) <= TOL
    assert P.rel(forked[3:], hooked[1:3]) <= TOL
    assert P.rel(inplace, hooked) <= TOL
    assert P.rel(hooked, plain) > 1e-3  # the disruption does something


def test_fork_with_bool_mask_moves_rows_and_their_references():
    """A non-contiguous fork mask reorders the rows (and the per-row references) and back."""
    model = with_spec(2, guidance=False)
    x, sigma, ctx, _, refs = P.tiny_inputs(model, refs=REFS)
    with torch.no_grad():
        forked = model(x, sigma, ctx, refs=refs, fork=torch.tensor([True, False, True]))
        hooked = disrupted_by_hook(model, 2, ("image",))(x, sigma, ctx, refs=refs)
        plain = model(x, sigma, ctx, refs=refs)
    assert P.rel(forked[:3], plain) <= TOL
    assert P.rel(forked[3:], hooked[[0, 2]]) <= TOL


def skipped(model, layers):
    """A copy of ``model`` whose listed blocks return their input."""
    model = copy.deepcopy(model)
    for i in layers:
        block = model.blocks()[i]
        if i < model.config.num_double:
            block.forward = lambda img, txt, *rest, rows=None: (img, txt)
        else:
            block.forward = lambda x, *rest, rows=None: x
    return model


def identity_everywhere(model, layers, rows):
    """A copy of ``model`` whose listed blocks give each of its ``rows`` rows identity attention."""
    model = copy.deepcopy(model)
    for i in layers:
        block = model.blocks()[i]
        original = block.forward
        block.forward = lambda *args, original=original, **kw: original(*args, rows=BlockRows(((0, rows),)))
    return model


@pytest.mark.parametrize("layers", [(0,), (1, 2), (2, 3), (3,)])
def test_slg_and_pag_branches_equal_separate_perturbed_forwards(layers):
    model = with_spec(1)
    x, sigma, ctx, g, refs = P.tiny_inputs(model, refs=REFS)
    src = slice(1, 3)
    sub = (x[src], sigma[src], ctx[src])
    sub_kw = dict(guidance=g[src], refs=(refs[0], refs[1][src]))
    branches = (Branch(src, SkipLayers(layers)), Branch(src, IdentityAttention(layers)))
    with torch.no_grad():
        out = model(x, sigma, ctx, guidance=g, refs=refs, branches=branches)
        plain = model(x, sigma, ctx, guidance=g, refs=refs)
        skip_ref = skipped(model, layers)(*sub, **sub_kw)
        pag_ref = identity_everywhere(model, layers, 2)(*sub, **sub_kw)
    assert out.shape[0] == 3 + 2 + 2
    assert P.rel(out[:3], plain) <= TOL
    assert P.rel(out[3:5], skip_ref) <= TOL
    assert P.rel(out[5:7], pag_ref) <= TOL
    assert P.rel(out[3:5], plain[src]) > 1e-3 and P.rel(out[5:7], plain[src]) > 1e-3


def test_dg_slg_pag_in_one_call_equal_each_alone():
    """[u | c | dg | slg | pag] from one call: SLG born at block 0, DG at block 1 (after it)."""
    model = with_spec(1)
    x, sigma, ctx, g, refs = P.tiny_inputs(model, B=2, refs=REFS[:1])
    cond = slice(1, 2)
    branches = (Branch(cond, MADisruption()), Branch(cond, SkipLayers((0, 2))), Branch(cond, IdentityAttention((3,))))
    kw = dict(guidance=g, refs=refs)
    with torch.no_grad():
        out = model(x, sigma, ctx, branches=branches, **kw)
        alone = [model(x, sigma, ctx, fork=cond, **kw)[2:], model(x, sigma, ctx, branches=branches[1:2], **kw)[2:],
                 model(x, sigma, ctx, branches=branches[2:], **kw)[2:]]
        plain = model(x, sigma, ctx, **kw)
    assert out.shape[0] == 5 and P.rel(out[:2], plain) <= TOL
    for i, ref in enumerate(alone):
        assert P.rel(out[2 + i:3 + i], ref) <= TOL, i


# ---- one graph ----------------------------------------------------------------------------

ROWS = {"plain": {}, "fork": {"fork": slice(1, 3)},
        "dg_slg_pag": {"fork": slice(2, 3), "branches": (Branch(slice(2, 3), SkipLayers((0, 2))),
                                                         Branch(slice(2, 3), IdentityAttention((1,))))}}


@pytest.mark.parametrize("rows", ROWS)
def test_forward_with_references_is_one_graph(rows):
    model = with_spec(1)
    x, sigma, ctx, g, refs = P.tiny_inputs(model, refs=REFS)
    one_graph(model, x, sigma, ctx, guidance=g, refs=refs, **ROWS[rows])


def test_compiled_fullgraph_equals_eager():
    model = with_spec(1)
    x, sigma, ctx, g, refs = P.tiny_inputs(model, refs=REFS)
    kw = dict(guidance=g, refs=refs, **ROWS["dg_slg_pag"])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert P.rel(compiled(x, sigma, ctx, **kw), model(x, sigma, ctx, **kw)) <= REL


def test_cfg_dg_step_with_references_is_one_graph():
    """The guided step (batching [uncond | cond] with the shared reference tuple, one call with
    the DG fork and the SLG / PAG branches, the combination) is one graph."""
    model = with_spec(1)
    x, _, ctx, _, refs = P.tiny_inputs(model, B=4, refs=REFS[:1])
    cond, uncond = {"context": ctx[:2], "refs": refs}, {"context": ctx[2:], "refs": refs}
    rule = Guidance(cfg=4.0, dg=2.0, slg=2.5, slg_layers=(2,), pag=1.0, pag_layers=(1,))

    def step(x):
        return guided_velocity(model, x, 0.7, cond, uncond, rule, 4.0)[0]

    one_graph(step, x[:2])
