"""Every guidance term as rows of one call: the batched sampler equals separate perturbed calls,
and CFG-Zero* / APG equal diffusers' guider formulas (diffusers/guiders/
classifier_free_zero_star_guidance.py and adaptive_projected_guidance.py are the reference)."""
import pytest
import torch

import mmdit
from mmdit.samplers import APG, Guidance, GuidanceState, sample, sd3_sigmas
from mmdit.samplers.guidance import _cfg
from helpers import identity_everywhere, skipped
from helpers import inputs, rel_err, tiny
from helpers import Recorder

FORMULA_TOL = 1e-6  # our combination vs diffusers' on the same fp32 tensors, relative
LOOP_TOL = 1e-4  # batched sampler vs separate calls, fp32 latents


def reference_loop(model, x, sigmas, cond, uncond, g, cfg, dg, slg, slg_layers, pag, pag_layers):
    """One separate call per term and step: the perturbed ones on models that skip blocks or
    use identity attention everywhere (tests/test_branches.py), DG through ``disrupt``."""
    B = x.shape[0]
    skip_model, pag_model = skipped(model, slg_layers), identity_everywhere(model, pag_layers, B)
    gs = None if g is None else torch.full((B,), g)
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sig = torch.full((B,), s)
        args = (x, sig, cond["context"], cond["pooled"])
        v_c = model(*args, guidance=gs)
        v_u = model(x, sig, uncond["context"], uncond["pooled"], guidance=gs)
        v = v_u + cfg * (v_c - v_u)
        v = v + dg * (v_c - model(*args, guidance=gs, disrupt=slice(0, B)))
        v = v + slg * (v_c - skip_model(*args, guidance=gs))
        v = v + pag * (v_c - pag_model(*args, guidance=gs))
        x = x + (s_next - s) * v
    return x


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cfg_dg_slg_pag_one_call_per_step_equal_separate_calls(family):
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=1)
    x, _, ctx, pooled, _ = inputs(model, B=4)
    cond = {"context": ctx[:2], "pooled": pooled[:2]}
    uncond = {"context": ctx[2:], "pooled": pooled[2:]}
    g = 3.5 if family == "flux" else None
    slg_layers, pag_layers = (1, 2), (2,)
    sigmas = sd3_sigmas(3)
    rec = Recorder(model)
    with torch.no_grad():
        out = sample(rec, x[:2], sigmas, cond, uncond, guide=Guidance(cfg=4.0, dg=1.5, slg=2.5, slg_layers=slg_layers,
                     pag=0.7, pag_layers=pag_layers), guidance=g)
        ref = reference_loop(model, x[:2], sigmas, cond, uncond, g, 4.0, 1.5, 2.5, slg_layers, 0.7, pag_layers)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= LOOP_TOL
    assert [rows for rows, _ in rec.calls] == [4, 4, 4]  # [uncond | cond] in, one call per step


def test_intervals_and_layers_pick_the_rows():
    rule = Guidance(cfg=3.0, dg=1.0, slg=2.0, slg_layers=[7, 8], slg_interval=(0.2, 0.6), pag=1.0, pag_layers=(3,),
                    pag_interval=(0.5, 1.0))
    assert rule.active(0.8, True) == (True, ("dg", "pag"))
    assert rule.active(0.6, False) == (False, ("dg", "slg", "pag"))
    assert rule.active(0.1, True) == (True, ("dg",))
    assert rule.slg_layers == (7, 8)
    with pytest.raises(ValueError, match=r"slg=2.0 needs slg_layers"):
        Guidance(slg=2.0)
    with pytest.raises(ValueError, match="choose one"):
        Guidance(cfg=3.0, cfg_zero_star=True, apg=APG())


def test_cfg_zero_star_equals_diffusers_guider():
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(3, 16, 6, 4, generator=g), torch.randn(3, 16, 6, 4, generator=g)
    alpha = cfg_zero_star_scale(v_c.flatten(1), v_u.flatten(1)).view(-1, 1, 1, 1)
    want = v_u * alpha + 4.5 * (v_c - v_u * alpha)  # the guider's non-original formulation
    got = _cfg(v_u, v_c, Guidance(cfg=4.5, cfg_zero_star=True), None)
    assert ((got - want).abs().max() / want.abs().max()).item() <= FORMULA_TOL


@pytest.mark.parametrize("momentum", [None, -0.5])
def test_apg_equals_diffusers_normalized_guidance(momentum):
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(1)
    rule = Guidance(cfg=5.0, apg=APG(eta=0.3, norm_threshold=4.0, momentum=momentum))
    state, buffer = GuidanceState(), None if momentum is None else MomentumBuffer(momentum)
    for _ in range(3):  # momentum carries over model evaluations
        v_c, v_u = torch.randn(2, 16, 6, 4, generator=g), torch.randn(2, 16, 6, 4, generator=g)
        want = normalized_guidance(v_c, v_u, 5.0, buffer, eta=0.3, norm_threshold=4.0)
        got = _cfg(v_u, v_c, rule, state)
        assert ((got - want).abs().max() / want.abs().max()).item() <= FORMULA_TOL


def test_cfg_zero_star_first_step_calls_no_model():
    model = tiny("sd3")
    x, _, ctx, pooled, _ = inputs(model, B=2)
    rec = Recorder(model)
    cond, uncond = {"context": ctx[:1], "pooled": pooled[:1]}, {"context": ctx[1:], "pooled": pooled[1:]}
    with torch.no_grad():
        out = sample(rec, x[:1], sd3_sigmas(3), cond, uncond, guide=Guidance(cfg=4.0, cfg_zero_star=True, apg=None))
    assert len(rec.calls) == 2 and torch.isfinite(out).all()  # step 0: zero velocity, no call
