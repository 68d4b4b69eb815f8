"""Sigma schedules equal diffusers' FlowMatchEulerDiscreteScheduler as its pipelines set it up."""
import numpy as np
import pytest
import torch

from mmdit.samplers.schedules import SCHEDULES, beta_ppf, flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_flow_match_euler_discrete as flow_euler  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

SIGMA_ATOL = 1e-6  # float32 schedules, as diffusers builds them
RESPACED = [s for s in SCHEDULES if s != "default"]
USE = {"beta": "use_beta_sigmas", "karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


def _mp_beta_ppf(q, a, b):
    """An independent Beta quantile (mpmath, 30 digits) standing in for scipy.stats.beta.ppf."""
    import mpmath

    if q <= 0 or q >= 1:
        return float(q >= 1)
    with mpmath.workdps(30):
        return float(mpmath.findroot(lambda x: mpmath.betainc(a, b, 0, x, regularized=True) - q, (0, 1),
                                     solver="anderson"))


@pytest.fixture
def beta_sigmas_without_scipy(monkeypatch):
    """diffusers' beta sigmas call scipy.stats.beta.ppf; without scipy, feed it mpmath's quantile."""
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        pytest.importorskip("mpmath")
        stats = type("stats", (), {"beta": type("beta", (), {"ppf": staticmethod(_mp_beta_ppf)})})
        monkeypatch.setattr(flow_euler, "scipy", type("scipy", (), {"stats": stats}), raising=False)
        monkeypatch.setattr(flow_euler, "is_scipy_available", lambda: True)


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_sd3_matches_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)  # StableDiffusion3Pipeline's scheduler
    sched.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift=shift)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)
    assert ours[0] == 1 and ours[-1] == 0


def test_sd3_reference_values():
    s = sd3_sigmas(28)  # docs/architecture.md, schedules
    torch.testing.assert_close(s[:3], torch.tensor([1.0, 0.987381, 0.974108]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-3:], torch.tensor([0.110906, 0.008929, 0.0]), atol=1e-6, rtol=0)


def _flux_scheduler(**kw):
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096, **kw)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("hw", [(1024, 1024), (512, 512), (1024, 768), (256, 1360), (1440, 1440)])
def test_flux_matches_diffusers(steps, hw):
    seq = flux_seq_len(*hw)
    sched = _flux_scheduler()  # as FluxPipeline: sigmas = linspace(1, 1/N, N), mu = calculate_shift
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert flux_mu(seq) == pytest.approx(mu, abs=1e-12)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flux_sigmas(steps, seq)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)


def test_flux_reference_values():
    assert flux_seq_len(1024, 1024) == 4096 and flux_seq_len(1024, 768) == 3072
    assert flux_mu(flux_seq_len(1024, 768)) == pytest.approx(0.976667, abs=1e-6)
    s = flux_sigmas(28, 4096)  # docs/architecture.md, schedules: mu = 1.15
    torch.testing.assert_close(s[:3], torch.tensor([1.0, 0.988409, 0.976222]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[-3:], torch.tensor([0.195455, 0.104721, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_unshifted(steps):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)  # schnell's config
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = flux_sigmas(steps, 4096, shift=False)
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)
    if steps == 4:
        assert ours.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("steps", [1, 2, 5, 28])
@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("schedule", RESPACED)
def test_sd3_respaced_match_diffusers(steps, shift, schedule, beta_sigmas_without_scipy):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, **{USE[schedule]: True})
    sched.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift=shift, schedule=schedule)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas, atol=SIGMA_ATOL, rtol=0)
    assert ours[0] == 1 and ours[-1] == 0 and (ours[1:] <= ours[:-1]).all()


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("seq", [flux_seq_len(1024, 1024), flux_seq_len(512, 768)])
@pytest.mark.parametrize("schedule", RESPACED)
def test_flux_respaced_match_diffusers(steps, seq, schedule, beta_sigmas_without_scipy):
    sched = _flux_scheduler(**{USE[schedule]: True})
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(flux_sigmas(steps, seq, schedule=schedule), sched.sigmas, atol=SIGMA_ATOL, rtol=0)
    schnell = FlowMatchEulerDiscreteScheduler(shift=1.0, **{USE[schedule]: True})
    schnell.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps))
    torch.testing.assert_close(flux_sigmas(steps, seq, shift=False, schedule=schedule), schnell.sigmas,
                               atol=SIGMA_ATOL, rtol=0)


@pytest.mark.parametrize("q", [1e-9, 0.01, 0.3, 0.5, 0.77, 1 - 1e-6])
@pytest.mark.parametrize("ab", [(0.6, 0.6), (2.0, 0.5)])
def test_beta_quantile(q, ab):
    pytest.importorskip("mpmath")
    assert beta_ppf(q, *ab) == pytest.approx(_mp_beta_ppf(q, *ab), rel=1e-10, abs=1e-15)


def test_bad_schedule_names_the_choices():
    for fn in (lambda: sd3_sigmas(4, schedule="cosine"), lambda: flux_sigmas(4, 4096, schedule="Karras")):
        with pytest.raises(ValueError, match="schedule must be one of 'default', 'beta', 'karras', 'exponential'"):
            fn()


def test_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        sd3_sigmas(0)
    with pytest.raises(ValueError, match="steps"):
        flux_sigmas(2.5, 4096)
