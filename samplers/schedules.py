"""Flow-matching sigma schedules for SD3 / SD3.5 and FLUX.1 (REFERENCE.md section 6).

A schedule is a float32 tensor of ``steps + 1`` noise levels running from 1 (pure noise)
down to a final 0; the Euler loop walks its consecutive pairs. The values equal diffusers'
``FlowMatchEulerDiscreteScheduler.sigmas`` as the SD3 and FLUX pipelines configure it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma, shift: float):
    """SD3's static time shift (a Moebius map): ``s*t / (1 + (s-1)*t)``; 1 -> 1, 0 -> 0."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift(sigma, mu: float):
    """FLUX's exponential time shift: ``e^mu / (e^mu + (1/t - 1))`` (diffusers ``time_shift(mu, 1, t)``)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
            base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """mu, linear in the number of packed image tokens: 0.5 at 256 tokens, 1.15 at 4096 (1024^2)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def _finish(sigmas: np.ndarray) -> torch.Tensor:
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3 / SD3.5 schedule: ``steps + 1`` float32 sigmas, shifted by ``shift``, ending at 0.

    Timesteps are spaced linearly between the *shifted* ends of the 1000-step training table
    (1 and shift(1/1000)) and shifted once more, as in diffusers and the SAI reference; so
    for 28 steps the last nonzero sigma is ~0.00893, not 1/1000.
    """
    _check_steps(steps)
    # The training table is float32 in diffusers; its smallest shifted value is the end point.
    sigma_min = float(shift_sigma(torch.tensor(1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32), shift))
    t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    return _finish(shift_sigma(t, shift))


def flux_sigmas(steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                base_seq_len: int = 256, max_seq_len: int = 4096, shift: bool = True) -> torch.Tensor:
    """FLUX.1 schedule: ``steps + 1`` float32 sigmas, ending at 0.

    ``image_seq_len`` is the number of packed (2x2) image tokens, ``(H/16) * (W/16)``; it sets
    mu (``flux_mu``) for the exponential time shift of ``linspace(1, 1/steps, steps)``.
    ``shift=False`` is FLUX.1-schnell: the plain linear schedule (4 steps: 1, .75, .5, .25, 0).
    """
    _check_steps(steps)
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # the FLUX pipeline's sigmas
    if shift:
        mu = flux_mu(image_seq_len, base_shift, max_shift, base_seq_len, max_seq_len)
        t = time_shift(t, mu)
    return _finish(t)


def flux_seq_len(height: int, width: int) -> int:
    """Packed image tokens for an image of ``height x width`` pixels (VAE /8, then 2x2 packing)."""
    return math.ceil(height / 16) * math.ceil(width / 16)
