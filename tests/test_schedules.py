"""Sigma schedules equal diffusers' FlowMatchEulerDiscreteScheduler as its pipelines set it up."""
import numpy as np
import pytest
import torch

from mmdit.samplers.schedules import flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402


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


def test_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        sd3_sigmas(0)
    with pytest.raises(ValueError, match="steps"):
        flux_sigmas(2.5, 4096)
