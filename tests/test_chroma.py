"""The Chroma transformer: parity with diffusers' ChromaTransformer2DModel with a real bool text mask,
the approximator's rows in the official order, DG's fork / branches / one graph, clear errors."""
import copy

import pytest
import torch

import mmdit
from mmdit.branches import Branch, IdentityAttention, MADisruption, SkipLayers
from mmdit.models.chroma import modulation_starts
from mmdit.models.rows import BlockRows
from mmdit.samplers import Guidance, guided_velocity
from mmdit.weights import keymaps

from helpers import compile_whole, one_graph
import peers_chroma as pc

TOL = 1e-5  # fp32 parity, max|ours - peer| / max|peer|
REL = 1e-5  # compiled vs eager, fp32
# 2 double + 2 single blocks: the fork and the branches in both kinds
SMALL = dict(num_double=2, num_single=2, heads=2, head_dim=16, context_dim=32, axes=(4, 6, 6), approx_in=8,
             approx_hidden=32, approx_layers=2)


def ours_from(peer):
    """Our model holding the peer's weights (through the key table)."""
    c = peer.config
    config = mmdit.ChromaConfig(num_double=c.num_layers, num_single=c.num_single_layers,
                                num_heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                                context_dim=c.joint_attention_dim, axes_dim=tuple(c.axes_dims_rope),
                                approximator_in=c.approximator_num_channels,
                                approximator_hidden=c.approximator_hidden_dim,
                                approximator_layers=c.approximator_layers)
    model = mmdit.build_transformer(config)
    model.load_state_dict(keymaps.from_diffusers(pc.peers.diffusers_state(peer), "chroma", pc.hidden(peer)))
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    peer = pc.chroma_peer(**SMALL)  # diffusers as it is
    return ours_from(peer), peer


@pytest.mark.parametrize("masked", [True, False], ids=["bool-mask", "no-mask"])
def test_matches_diffusers_with_and_without_the_text_mask(pair, masked):
    model, peer = pair
    err = pc.parity(model, peer, masked=masked)
    print(f"\nchroma vs diffusers ({'masked' if masked else 'no mask'}): {err:.2e}")
    assert err <= TOL


def test_the_mask_changes_the_output_and_padding_is_ignored(pair):
    """Masked tokens are ignored: changing them changes nothing; the mask itself does change the output."""
    model, _ = pair
    x, sigma, ctx, mask = pc.inputs(pc.chroma_peer(**SMALL))
    assert not mask.all()
    noisy = torch.where(mask[..., None], ctx, torch.randn_like(ctx))
    with torch.no_grad():
        masked, repadded = model(x, sigma, ctx, context_mask=mask), model(x, sigma, noisy, context_mask=mask)
        open_ = model(x, sigma, ctx)
        as_float = model(x, sigma, ctx, context_mask=mask.float())
    assert pc.rel(repadded, masked) <= TOL and torch.equal(as_float, masked)
    assert pc.rel(open_[:-1], masked[:-1]) > 1e-3 and pc.rel(open_[-1:], masked[-1:]) <= TOL  # last row: all kept


def test_diffusers_own_rmsnorm_eps_is_the_only_difference():
    """diffusers' approximator norms use the dtype's eps (1.2e-7 in fp32); the official model 1e-6."""
    official, default = pc.chroma_peer(official_eps=True), pc.chroma_peer(official_eps=False)
    model = ours_from(official)
    assert pc.parity(model, official) <= pc.parity(model, default) <= TOL


def test_modulation_rows_are_the_official_order():
    """flow's distribute_modulations: single blocks (3 each), double image (6), double text (6), final (2)."""
    rows = modulation_starts(mmdit.preset("chroma"))
    assert rows["single"][:2] == [0, 3] and rows["single"][-1] == 111
    assert rows["img"][:2] == [114, 120] and rows["txt"][:2] == [228, 234] and rows["final"] == [342]
    assert mmdit.preset("chroma").modulation_rows == 344
    model = mmdit.build_transformer("chroma", device="meta")
    assert not any(k.startswith(("time_in", "vector_in", "guidance_in")) or "_mod." in k or "modulation" in k
                   for k in model.state_dict())
    assert (model.double_blocks[18].txt_mod.start, model.single_blocks[37].modulation.start) == (228 + 6 * 18, 111)


def test_rows_are_independent_and_errors_are_clear(pair):
    model, _ = pair
    x, sigma, ctx, mask = pc.inputs(pc.chroma_peer(**SMALL))
    with torch.no_grad():
        full = model(x, sigma, ctx, context_mask=mask)
        one = model(x[1:2], sigma[1:2], ctx[1:2], context_mask=mask[1:2])
    assert pc.rel(full[1:2], one) <= TOL
    with pytest.raises(ValueError, match=r"this model takes context \(B, L, 32\)"):
        model(x, sigma, torch.randn(3, 7, 40))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(x[..., :11, :], sigma, ctx)
    with pytest.raises(ValueError, match=r"context_mask must be \(B, L\) = \(3, 7\)"):
        model(x, sigma, ctx, context_mask=mask[:, :5])


# ---- DG: the fork, the branches, one graph ----------------------------------------------

def with_spec(pair, block=1, rho=0.0):
    model = copy.deepcopy(pair[0])
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=block, rho=rho)
    return model


@pytest.mark.parametrize("block", [1, 2, 3])  # a double block, the first and the last single block
def test_fork_rows_equal_disrupted_rows_with_each_rows_mask(pair, block):
    model = with_spec(pair, block, rho=lambda s: 0.5 * s)
    x, sigma, ctx, mask = pc.inputs(pc.chroma_peer(**SMALL))
    with torch.no_grad():
        plain = model(x, sigma, ctx, context_mask=mask)
        forked = model(x, sigma, ctx, context_mask=mask, fork=slice(1, 3))
        disrupted = model(x, sigma, ctx, context_mask=mask, disrupt=slice(0, 3))
    assert forked.shape[0] == 5
    assert pc.rel(forked[:3], plain) <= TOL and pc.rel(forked[3:], disrupted[1:]) <= TOL
    assert pc.rel(disrupted, plain) > 1e-3


def skipped(model, layers):
    model = copy.deepcopy(model)
    blocks = [*model.double_blocks, *model.single_blocks]
    for i in layers:
        blocks[i].forward = (lambda img, txt, *rest, rows=None: (img, txt)) if i < model.config.num_double \
            else (lambda x, *rest, rows=None: x)
    return model


def identity_everywhere(model, layers, rows):
    model = copy.deepcopy(model)
    blocks = [*model.double_blocks, *model.single_blocks]
    for i in layers:
        original = blocks[i].forward
        blocks[i].forward = lambda *args, original=original, **kw: original(*args, rows=BlockRows(((0, rows),)))
    return model


def test_dg_slg_pag_branches_equal_separate_forwards(pair):
    """[u | c | dg | slg | pag] in one call: each branch equals a forward of its source rows with that
    perturbation alone (SLG: blocks returning their input; PAG: identity attention), masks per row."""
    model = with_spec(pair, block=2)
    x, sigma, ctx, mask = pc.inputs(pc.chroma_peer(**SMALL))
    src, slg, pag = slice(1, 3), (1, 2), (0, 3)
    branches = (Branch(src, MADisruption()), Branch(src, SkipLayers(slg)), Branch(src, IdentityAttention(pag)))
    sub = dict(context_mask=mask[src])
    with torch.no_grad():
        out = model(x, sigma, ctx, context_mask=mask, branches=branches)
        plain = model(x, sigma, ctx, context_mask=mask)
        dg = model(x[src], sigma[src], ctx[src], disrupt=slice(0, 2), **sub)
        skip = skipped(model, slg)(x[src], sigma[src], ctx[src], **sub)
        pag_ref = identity_everywhere(model, pag, 2)(x[src], sigma[src], ctx[src], **sub)
    assert out.shape[0] == 3 + 3 * 2
    assert pc.rel(out[:3], plain) <= TOL
    for got, want in ((out[3:5], dg), (out[5:7], skip), (out[7:9], pag_ref)):
        assert pc.rel(got, want) <= TOL and pc.rel(got, plain[src]) > 1e-3


@pytest.fixture(scope="module")
def shallow():
    """1 double + 1 single block: tracing time grows with the depth."""
    peer = pc.chroma_peer(**{**SMALL, "num_double": 1, "num_single": 1})
    return ours_from(peer), peer


def test_forward_is_one_graph_with_and_without_the_fork(shallow):
    """No graph break (a host sync or a data-dependent shape would show as one) in the plain forward,
    with the DG fork, and with DG + SLG + PAG branches; the fork compiled fullgraph equals eager."""
    model = with_spec(shallow, block=1, rho=lambda s: 0.5 * s)
    x, sigma, ctx, mask = pc.inputs(shallow[1])
    fork = {"fork": slice(1, 3)}
    for kw in ({}, fork, {"fork": slice(2, 3), "branches": (Branch(slice(2, 3), SkipLayers((0,))),
                                                             Branch(slice(2, 3), IdentityAttention((1,))))}):
        with torch.no_grad():
            got = compile_whole(model, x, sigma, ctx, backend="eager", context_mask=mask, **kw)
            assert pc.rel(got, model(x, sigma, ctx, context_mask=mask, **kw)) <= REL, kw


def test_cfg_dg_step_is_one_graph(shallow):
    """The guided step: cond / uncond batched with their masks, one call with the fork, CFG + DG."""
    model = with_spec(shallow)
    x, _, ctx, mask = pc.inputs(shallow[1], B=4)
    cond = {"context": ctx[:2], "context_mask": mask[:2]}
    uncond = {"context": ctx[2:], "context_mask": mask[2:]}
    one_graph(lambda x: guided_velocity(model, x, 0.7, cond, uncond, Guidance(cfg=4.0, dg=2.0))[0], x[:2])
