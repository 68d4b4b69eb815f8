"""Perturbed branches inside one call: each branch's rows equal a separate full forward of its
source rows with that perturbation (done here without the branch machinery), for SD3 (with an
MMDiT-X dual-attention block) and FLUX (double and single blocks)."""
import pytest
import torch

import mmdit
from mmdit.branches import Branch, IdentityAttention, MADisruption, SkipLayers
from helpers import TOL, identity_everywhere, inputs, rel_err, skipped, tiny

# Tiny models: SD3 3 joint blocks (block 0 dual attention, block 2 the last); FLUX 2 double + 2 single.
LAYERS = {"sd3": [(0,), (1, 2), (2,)], "flux": [(0,), (1, 2), (2, 3), (3,)]}


def source_rows(t, src):
    return None if t is None else t[src]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_each_branch_equals_a_separate_perturbed_forward(family):
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=1)
    x, sigma, ctx, pooled, g = inputs(model)  # rows: [uncond | cond | cond]
    src = slice(1, 3)
    sub = [source_rows(t, src) for t in (x, sigma, ctx, pooled, g)]
    for layers in LAYERS[family]:
        branches = (Branch(src, SkipLayers(layers)), Branch(src, IdentityAttention(layers)))
        with torch.no_grad():
            out = model(x, sigma, ctx, pooled, guidance=g, branches=branches)
            plain = model(x, sigma, ctx, pooled, guidance=g)
            skip_ref = skipped(model, layers)(*sub[:4], guidance=sub[4])
            pag_ref = identity_everywhere(model, layers, 2)(*sub[:4], guidance=sub[4])
        assert out.shape[0] == 3 + 2 + 2
        assert rel_err(out[:3], plain) <= TOL, layers
        assert rel_err(out[3:5], skip_ref) <= TOL, layers
        assert rel_err(out[5:7], pag_ref) <= TOL, layers
        assert rel_err(out[3:5], plain[src]) > 1e-3 and rel_err(out[5:7], plain[src]) > 1e-3  # they do something


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dg_slg_pag_in_one_call_equal_each_alone(family):
    """CFG + DG + SLG + PAG rows [u | c | dg | slg | pag] from one call: DG born at block 1
    after SLG was born at block 0, so the fork copies rows that are not the last ones."""
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=1, rho=lambda s: 0.5 * s)
    x, sigma, ctx, pooled, g = inputs(model, B=2)
    cond = slice(1, 2)
    slg, pag = LAYERS[family][1], LAYERS[family][2]
    branches = (Branch(cond, MADisruption()), Branch(cond, SkipLayers((0, *slg))),
                Branch(cond, IdentityAttention(pag)))
    with torch.no_grad():
        out = model(x, sigma, ctx, pooled, guidance=g, branches=branches)
        alone = [model(x, sigma, ctx, pooled, guidance=g, fork=cond)[2:],
                 model(x, sigma, ctx, pooled, guidance=g, branches=branches[1:2])[2:],
                 model(x, sigma, ctx, pooled, guidance=g, branches=branches[2:])[2:]]
        plain = model(x, sigma, ctx, pooled, guidance=g)
    assert out.shape[0] == 5
    assert rel_err(out[:2], plain) <= TOL
    for i, ref in enumerate(alone):
        assert rel_err(out[2 + i:3 + i], ref) <= TOL, i


def test_fork_keeps_its_meaning_beside_other_branches():
    """fork= is the first branch; the given branches follow it."""
    model = tiny("sd3")
    model.ma = mmdit.MASpec(channels=(3,), block=2)
    x, sigma, ctx, pooled, _ = inputs(model)
    with torch.no_grad():
        both = model(x, sigma, ctx, pooled, fork=slice(2, 3), branches=(Branch(slice(0, 1), SkipLayers((1,))),))
        fork = model(x, sigma, ctx, pooled, fork=slice(2, 3))
        skip = model(x, sigma, ctx, pooled, branches=(Branch(slice(0, 1), SkipLayers((1,))),))
    assert rel_err(both[:4], fork) <= TOL and rel_err(both[4:], skip[3:]) <= TOL


def test_open_ended_source_slices_resolve_against_the_batch():
    """slice(1, None) names rows 1.. of the input, for the DG fork as for the other branches."""
    model = tiny("flux")
    model.ma = mmdit.MASpec(channels=(3, 17), block=2)
    x, sigma, ctx, pooled, g = inputs(model)
    with torch.no_grad():
        open_ended = model(x, sigma, ctx, pooled, guidance=g, branches=(
            Branch(slice(1, None), MADisruption()), Branch(slice(-1, None), SkipLayers((1,)))))
        explicit = model(x, sigma, ctx, pooled, guidance=g, fork=slice(1, 3),
                         branches=(Branch(slice(2, 3), SkipLayers((1,))),))
    assert open_ended.shape[0] == 6 and torch.equal(open_ended, explicit)


def test_branch_errors_are_clear():
    model = tiny("flux")
    x, sigma, ctx, pooled, g = inputs(model)
    with pytest.raises(ValueError, match=r"layers \(4,\) must be block indices in 0..3"):
        model(x, sigma, ctx, pooled, guidance=g, branches=(Branch(slice(1, 2), SkipLayers((4,))),))
    with pytest.raises(ValueError, match="non-empty slice"):
        model(x, sigma, ctx, pooled, guidance=g, branches=(Branch(slice(2, 2), SkipLayers((1,))),))
    with pytest.raises(ValueError, match="need an MA spec"):
        model(x, sigma, ctx, pooled, guidance=g, branches=(Branch(slice(1, 2), MADisruption()),))
    model.ma = mmdit.MASpec(channels=(1,), block=1)
    with pytest.raises(ValueError, match="one MA disruption per call"):
        model(x, sigma, ctx, pooled, guidance=g, fork=slice(1, 2), branches=(Branch(slice(1, 2), MADisruption()),))
