"""The batched Euler sampler equals a hand-written loop of separate branch calls."""
import pytest
import torch

import mmdit
from mmdit.samplers import sample, sd3_sigmas
from mmdit.samplers import Guidance
from helpers import FakeModel, Recorder, conds, reference_loop


@pytest.mark.parametrize("cfg,dg,use_uncond", [(1.0, 0.0, False), (4.5, 0.0, True), (1.0, 2.0, False),
                                               (4.5, 2.0, True), (4.5, 2.0, False), (1.0, 2.0, True)])
def test_fake_model_matches_reference(cfg, dg, use_uncond):
    model = Recorder(FakeModel())
    B, steps = 2, 6
    cond, uncond = conds(B, 3, 5, 6)
    uncond = uncond if use_uncond else None
    noise = torch.randn(B, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    sigmas = sd3_sigmas(steps)
    out = sample(model, noise, sigmas, cond, uncond, guide=Guidance(cfg=cfg, dg=dg))
    ref = reference_loop(model.model, noise, sigmas, cond, uncond, cfg, dg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert len(model.calls) == steps  # one call per step
    n_in = B * (2 if (use_uncond and cfg != 1) else 1)
    assert all(rows == n_in for rows, _ in model.calls)
    fork = slice(n_in - B, n_in) if dg else None  # the cond rows, static
    assert all(f == fork for _, f in model.calls)


def test_intervals_drop_branches():
    model = Recorder(FakeModel())
    B = 3
    cond, uncond = conds(B, 3, 5, 6)
    noise = torch.randn(B, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    kw = dict(cfg=3.0, dg=1.5, cfg_interval=(0.5, 1.0), dg_interval=(0.2, 0.6))
    out = sample(model, noise, sigmas, cond, uncond, guide=Guidance(**kw))
    ref = reference_loop(model.model, noise, sigmas, cond, uncond, 3.0, 1.5, (0.5, 1.0), (0.2, 0.6))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # sigma: 1.0 (u), 0.8 (u), 0.6 (u + m: both ends inclusive), 0.4 (m), 0.2 (m)
    assert [rows for rows, _ in model.calls] == [2 * B, 2 * B, 2 * B, B, B]
    assert [f is not None for _, f in model.calls] == [False, False, True, True, True]
    assert model.calls[2][1] == slice(B, 2 * B)


def test_dtype_noise_shape_and_errors():
    model = FakeModel()
    cond, _ = conds(1, 3, 5, 6)
    out = sample(model, (2, 4, 6, 6), sd3_sigmas(3), cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 6, 6) and out.dtype == torch.float32  # one cond row broadcasts
    half = sample(model, torch.randn(1, 4, 6, 6).bfloat16(), sd3_sigmas(2), cond)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="start"):
        Guidance(dg_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="same length"):
        sample(model, torch.randn(1, 4, 6, 6), sd3_sigmas(2), cond,
               {"context": torch.randn(1, 7, 5), "pooled": torch.randn(1, 6)}, guide=Guidance(cfg=2.0))
    with pytest.raises(ValueError, match="pooled"):
        sample(model, torch.randn(1, 4, 6, 6), sd3_sigmas(2), {"context": cond["context"]})
    model.ma = None
    with pytest.raises(ValueError, match="MA spec"):
        sample(model, torch.randn(1, 4, 6, 6), sd3_sigmas(2), cond, guide=Guidance(dg=1.0))


TINY = {
    "sd3": ("sd3.5-medium", dict(num_layers=3, num_heads=2, head_dim=16, context_dim=32, pooled_dim=24)),
    "flux": ("flux.1-dev", dict(num_double=1, num_single=2, num_heads=2, head_dim=16, axes_dim=(4, 6, 6),
                                context_dim=32, pooled_dim=24)),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_real_tiny_model_matches_reference(family):
    torch.manual_seed(0)
    name, kw = TINY[family]
    model = mmdit.build_transformer(name, **kw).eval()
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    rec = Recorder(model)
    B, steps = 2, 4
    cond, uncond = conds(B, 5, 32, 24, seed=4)
    noise = torch.randn(B, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigmas = sd3_sigmas(steps)
    g = 3.5 if family == "flux" else None
    kw = dict(cfg=4.0, dg=2.0, dg_interval=(0.0, 0.99))
    with torch.no_grad():
        out = sample(rec, noise, sigmas, cond, uncond, guidance=g, guide=Guidance(**kw))
        ref = reference_loop(model, noise, sigmas, cond, uncond, 4.0, 2.0, dg_interval=(0.0, 0.99), guidance=g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert [rows for rows, _ in rec.calls] == [2 * B] * steps
    assert [f is not None for _, f in rec.calls] == [False] + [True] * (steps - 1)  # sigma 1.0 is outside


def test_inference_mode_by_default_and_grad_on_request():
    """Parameters that require grad (a fresh model, a trainer's) leave no autograd graph behind
    unless grad=True asks for differentiable sampling."""
    torch.manual_seed(0)
    model = mmdit.build_transformer("sd3.5-medium", num_layers=2, num_heads=2, head_dim=8, context_dim=12,
                                    pooled_dim=10, pos_embed_max_size=8, dual_attention_layers=())
    assert all(p.requires_grad for p in model.parameters())
    cond = {"context": torch.randn(1, 3, 12), "pooled": torch.randn(1, 10)}
    out = sample(model, (1, 16, 4, 4), sd3_sigmas(2), cond, generator=torch.Generator().manual_seed(0))
    assert out.grad_fn is None and not out.requires_grad
    out = sample(model, (1, 16, 4, 4), sd3_sigmas(2), cond, generator=torch.Generator().manual_seed(0), grad=True)
    assert out.grad_fn is not None
    out.sum().backward()
    assert model.x_embedder.proj.weight.grad is not None


def test_callback_sees_every_step_and_warnings_for_ignored_arguments():
    model = FakeModel()
    cond, _ = conds(1, 3, 5, 6)
    seen = []
    with pytest.warns(UserWarning, match="cfg=4.5 has no effect without uncond"):
        sample(model, torch.randn(1, 4, 6, 6), sd3_sigmas(3), cond, guide=Guidance(cfg=4.5),
               callback=lambda i, s, x: seen.append((i, round(s, 4), tuple(x.shape))))
    assert [i for i, _, _ in seen] == [0, 1, 2] and seen[-1][1] == 0.0
    sd3 = mmdit.build_transformer("sd3.5-medium", num_layers=1, num_heads=1, head_dim=8, context_dim=5,
                                  pooled_dim=6, pos_embed_max_size=4, dual_attention_layers=())
    with pytest.warns(UserWarning, match="guidance=3.5 is FLUX.1-dev's distilled guidance; this sd3 model"):
        sample(sd3, torch.randn(1, 16, 4, 4), sd3_sigmas(1), cond, guidance=3.5)
