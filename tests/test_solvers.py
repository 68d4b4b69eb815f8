"""Euler, Heun and DPM++ 2M equal diffusers' flow-matching schedulers stepped by hand, on the
same deterministic guided velocity (FakeModel, CFG + DG); one batched model call per evaluation."""
import pytest
import torch
from helpers import FakeModel, Recorder, conds, reference_velocity

from mmdit import checks
from mmdit.samplers import SAMPLERS, Guidance, sample, sd3_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

# float32 latents of magnitude ~10, ours vs diffusers' .step loop (required: <= 1e-4 for DPM++ 2M). Measured
# <= 1.5e-5 (DPM++ 2M) and 2.5e-5 (Heun, 2 steps: diffusers round-trips v through x0 at sigma 0.009).
PARITY_ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers DPM, numpy 2
B, SHAPE = 2, (4, 6, 6)
GUIDE = dict(cfg=4.5, dg=2.0, dg_interval=(0.0, 0.9))  # the DG interval starts mid-schedule
SHIFT = 3.0  # SD3's flow shift


def _setup(seed=7):
    cond, uncond = conds(B, 3, 5, 6)
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return FakeModel(), cond, uncond, noise


def _diffusers_loop(sched, model, noise, cond, uncond):
    """The pipelines' loop: the model at each of ``sched.timesteps`` (at the matching sigma), then ``.step``."""
    x = noise
    sched.set_begin_index(0)
    for j, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[j])
        v = reference_velocity(model, x, sigma, cond, uncond, **GUIDE)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def _dpm(sigmas=None):
    """DPMSolverMultistepScheduler as diffusers configures it for flow models (SD3 shift); ``sigmas``
    replaces its own flow sigmas (which start at shift(0.999), not 1) with ours."""
    def make(steps):
        sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=SHIFT)
        sched.set_timesteps(steps)
        if sigmas is not None:
            sched.sigmas = sigmas(steps)
            sched.timesteps = sched.sigmas[:-1] * 1000
        return sched, sched.sigmas
    return make


def _flow_euler(steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(steps)
    return sched, sched.sigmas


def _flow_heun(steps):
    sched = FlowMatchHeunDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(steps)  # sigmas s0, s1, s1, s2, s2, ..., 0: the corrector re-uses each sigma
    return sched, torch.cat([sched.sigmas[:1], sched.sigmas[1::2]])


CASES = {
    "euler": ("euler", _flow_euler),
    "heun": ("heun", _flow_heun),
    "dpmpp_2m": ("dpmpp_2m", _dpm()),
    "dpmpp_2m-sd3-sigmas": ("dpmpp_2m", _dpm(lambda n: sd3_sigmas(n, SHIFT))),
    "dpmpp_2m-karras": ("dpmpp_2m", _dpm(lambda n: sd3_sigmas(n, SHIFT, schedule="karras"))),
}


@pytest.mark.parametrize("steps", [1, 2, 5, 12])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_scheduler(case, steps):
    sampler, scheduler = CASES[case]
    model, cond, uncond, noise = _setup()
    sched, sigmas = scheduler(steps)
    ref = _diffusers_loop(sched, model, noise, cond, uncond)
    ours = sample(model, noise, sigmas, cond, uncond, sampler=sampler, guide=Guidance(**GUIDE))
    torch.testing.assert_close(ours, ref, atol=PARITY_ATOL, rtol=0)


EVALUATIONS = {"euler": lambda n: n, "dpmpp_2m": lambda n: n, "heun": lambda n: 2 * n - 1}  # steps to sigma 0


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_one_batched_call_per_evaluation_and_a_callback_per_step(sampler):
    model, cond, uncond, noise = _setup()
    rec, steps, seen = Recorder(model), 5, []
    sigmas = sd3_sigmas(steps)
    sample(rec, noise, sigmas, cond, uncond, guide=Guidance(cfg=4.5, dg=2.0), sampler=sampler,
           callback=lambda i, s, x: seen.append((i, s, x.shape)))
    assert len(rec.calls) == EVALUATIONS[sampler](steps)
    assert all(rows == 2 * B and fork == slice(B, 2 * B) for rows, fork in rec.calls)  # [u | c] + forked c
    assert [i for i, _, _ in seen] == list(range(steps))
    assert [s for _, s, _ in seen] == sigmas[1:].tolist() and all(shape == noise.shape for _, _, shape in seen)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_dtype_kept_and_partial_schedule(sampler):
    model, cond, uncond, noise = _setup()
    half = sample(model, noise.bfloat16(), sd3_sigmas(3), cond, uncond, sampler=sampler, guide=Guidance(**GUIDE))
    assert half.dtype == torch.bfloat16 and half.shape == noise.shape and half.isfinite().all()
    sigmas = sd3_sigmas(6)
    out = sample(model, noise, sigmas[2:5], cond, uncond, sampler=sampler, guide=Guidance(**GUIDE))  # steps 2..3, not to 0
    assert out.shape == noise.shape and out.isfinite().all()


class ReusedOutput(FakeModel):
    """Returns the same output tensor on every call, as a CUDA-graph replay does."""

    def __call__(self, *args, **kwargs):
        v = super().__call__(*args, **kwargs)
        if getattr(self, "out", None) is None or self.out.shape != v.shape:
            self.out = torch.empty_like(v)
        return self.out.copy_(v)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_no_model_output_is_kept_across_calls(sampler):
    _, cond, _, noise = _setup()  # cond only, no guidance: the velocity is the model's output itself
    sigmas = sd3_sigmas(4)
    ref = sample(FakeModel(), noise, sigmas, cond, sampler=sampler)
    torch.testing.assert_close(sample(ReusedOutput(), noise, sigmas, cond, sampler=sampler), ref, atol=0, rtol=0)


class GaussianFlow:
    """The exact flow-matching velocity for Gaussian data x0 ~ N(m, t^2) (per channel): the ODE carries
    noise n to exactly ``m + t * n``, so a solver's error at sigma 0 is measurable."""

    ma = None

    def __init__(self, m, t):
        self.m, self.t = m.double(), t.double()

    def __call__(self, x, sigma, context, pooled, guidance=None):
        s, x = sigma.double()[:, None, None, None], x.double()
        var = s ** 2 + (1 - s) ** 2 * self.t ** 2  # of x_sigma = s * n + (1 - s) * x0
        x0 = self.m + (1 - s) * self.t ** 2 * (x - (1 - s) * self.m) / var  # E[x0 | x_sigma]
        return ((x - x0) / s).float()


def test_second_order_solvers_converge_faster():
    """16 karras steps: Heun and DPM++ 2M land >= 4x nearer the exact endpoint than Euler (measured:
    Euler 0.13, DPM++ 2M 0.012, Heun 0.015 max abs error)."""
    g = torch.Generator().manual_seed(0)
    m, t = 2 * torch.randn(1, 4, 1, 1, generator=g), 0.05 + 0.5 * torch.rand(1, 4, 1, 1, generator=g)
    noise = torch.randn(B, *SHAPE, generator=g)
    exact = (m + t * noise).float()
    cond = {"context": torch.zeros(1, 1, 1), "pooled": torch.zeros(1, 1)}
    sigmas = sd3_sigmas(16, schedule="karras")
    err = {s: (sample(GaussianFlow(m, t), noise, sigmas, cond, sampler=s) - exact).abs().max().item() for s in SAMPLERS}
    assert err["heun"] < err["euler"] / 4 and err["dpmpp_2m"] < err["euler"] / 4, err


def test_unknown_sampler_names_the_choices():
    assert tuple(SAMPLERS) == checks.SAMPLERS  # the names the CLI and Pipeline check before loading anything
    model, cond, _, noise = _setup()
    with pytest.raises(ValueError, match="sampler must be one of 'euler', 'dpmpp_2m', 'heun'; got 'dpm'"):
        sample(model, noise, sd3_sigmas(2), cond, sampler="dpm")
