"""Flow-matching sigma schedules for SD3 / SD3.5, FLUX.1, FLUX.2 and Qwen-Image (docs/architecture.md, "Schedules").

A schedule is a float32 tensor of ``steps + 1`` noise levels running from 1 (pure noise)
down to a final 0; the samplers walk its consecutive pairs. The values equal diffusers'
``FlowMatchEulerDiscreteScheduler.sigmas`` as the SD3, FLUX and Qwen-Image pipelines configure it, and
with ``schedule="beta" | "karras" | "exponential"`` that scheduler's ``use_beta_sigmas`` /
``use_karras_sigmas`` / ``use_exponential_sigmas``: the shifted schedule's first and last
nonzero sigmas kept, the steps between them re-spaced.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import SCHEDULES, choice

NUM_TRAIN_TIMESTEPS = 1000
KARRAS_RHO = 7.0  # EDM's rho (Karras et al. 2022), as in diffusers
BETA_ALPHA = BETA_BETA = 0.6  # "Beta Sampling is All You Need" (arXiv 2407.12173), diffusers' defaults


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


def _finish(sigmas: np.ndarray, schedule: str) -> torch.Tensor:
    sigmas = torch.from_numpy(np.asarray(respace(sigmas, schedule))).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def _check(steps: int, schedule: str) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    choice("schedule", schedule, SCHEDULES)


def respace(sigmas: np.ndarray, schedule: str = "default") -> np.ndarray:
    """The ``steps`` nonzero sigmas ``sigmas`` (high to low) re-spaced between their ends.

    default: unchanged. karras: uniform in ``sigma^(1/7)``. exponential: uniform in
    ``log sigma``. beta: ``lo + (hi - lo) * ppf(1 - u)`` for u uniform in [0, 1] and ppf the
    Beta(0.6, 0.6) quantile, so steps crowd at both ends. (diffusers' ``_convert_to_*``.)
    """
    if choice("schedule", schedule, SCHEDULES) == "default":
        return sigmas
    hi, lo, n = float(sigmas[0]), float(sigmas[-1]), len(sigmas)
    u = np.linspace(0.0, 1.0, n)
    if schedule == "karras":
        inv_hi, inv_lo = hi ** (1 / KARRAS_RHO), lo ** (1 / KARRAS_RHO)
        return (inv_hi + u * (inv_lo - inv_hi)) ** KARRAS_RHO
    if schedule == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    return np.array([lo + beta_ppf(q, BETA_ALPHA, BETA_BETA) * (hi - lo) for q in 1 - u])  # beta


def beta_ppf(q: float, a: float, b: float) -> float:
    """The q-quantile of Beta(a, b) (scipy's ``beta.ppf``) to ~1e-15 relative, in plain Python (no scipy).

    Newton on the regularized incomplete beta ``I_x(a, b) = q``, kept inside a shrinking
    bisection bracket (the density is infinite at 0 and 1 when a, b < 1).
    """
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        err = _beta_cdf(x, a, b, log_norm) - q
        if abs(err) <= 1e-15 * min(q, 1.0 - q):  # relative: tiny q live near x = 0
            break
        lo, hi = (x, hi) if err < 0 else (lo, x)
        pdf = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        step = x - err / pdf
        x = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-16:
            break
    return x


def _beta_cdf(x: float, a: float, b: float, log_norm: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), on the side where it converges fast."""
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _beta_cdf(1.0 - x, b, a, log_norm)
    front = math.exp(log_norm + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d, f = 1e-300, 1.0, 0.0, 1.0  # f = 1 + d_1 / (1 + d_2 / (1 + ...))
    for j in range(1, 400):
        m = j // 2
        if j % 2:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return front / f


def sd3_sigmas(steps: int, shift: float = 3.0, schedule: str = "default") -> torch.Tensor:
    """SD3 / SD3.5 schedule: ``steps + 1`` float32 sigmas, shifted by ``shift``, ending at 0.

    Timesteps are spaced linearly between the *shifted* ends of the 1000-step training table
    (1 and shift(1/1000)) and shifted once more, as in diffusers and the SAI reference; so
    for 28 steps the last nonzero sigma is ~0.00893, not 1/1000. ``schedule`` re-spaces the
    steps between those ends (``respace``).
    """
    _check(steps, schedule)
    # The training table is float32 in diffusers; its smallest shifted value is the end point.
    sigma_min = float(shift_sigma(torch.tensor(1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32), shift))
    t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps) / NUM_TRAIN_TIMESTEPS
    return _finish(shift_sigma(t, shift), schedule)


def flux_sigmas(steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                base_seq_len: int = 256, max_seq_len: int = 4096, shift: bool = True,
                schedule: str = "default", shift_terminal: float | None = None) -> torch.Tensor:
    """FLUX.1 schedule: ``steps + 1`` float32 sigmas, ending at 0.

    ``image_seq_len`` is the number of packed (2x2) image tokens, ``(H/16) * (W/16)``; it sets
    mu (``flux_mu``) for the exponential time shift of ``linspace(1, 1/steps, steps)``.
    ``shift=False`` is FLUX.1-schnell: the plain linear schedule (4 steps: 1, .75, .5, .25, 0).
    ``shift_terminal``: the last nonzero sigma stretched to it (``stretch_to_terminal``).
    ``schedule`` re-spaces the steps between the first and last nonzero sigma (``respace``).
    """
    _check(steps, schedule)
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # the FLUX pipeline's sigmas
    if shift:
        mu = flux_mu(image_seq_len, base_shift, max_shift, base_seq_len, max_seq_len)
        t = time_shift(t, mu)
    if shift_terminal:
        t = stretch_to_terminal(t, shift_terminal)
    return _finish(t, schedule)


def stretch_to_terminal(sigmas, terminal: float):
    """``1 - (1 - sigma) * (1 - terminal) / (1 - sigma_last)``: the schedule stretched so that its last
    nonzero sigma is ``terminal``, the first one still 1 (diffusers' ``stretch_shift_to_terminal``). One
    step (sigma 1 alone) stays as it is, where diffusers divides 0 by 0 (NaN)."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def qwen_image_sigmas(steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 0.9,
                      base_seq_len: int = 256, max_seq_len: int = 8192, shift_terminal: float | None = 0.02,
                      schedule: str = "default") -> torch.Tensor:
    """Qwen-Image schedule: FLUX.1's dynamic exponential shift with Qwen-Image's scheduler config
    (mu 0.5 at 256 image tokens, 0.9 at 8192), then stretched to end at ``shift_terminal`` before the
    final 0. ``image_seq_len``: 1.0 packs 2x2 latents, ``(H/16) * (W/16)`` (4096 at 1024^2: mu 0.6935,
    sigmas 1.0, 0.9897, ..., 0.0585, 0.02, 0); 2.1 has one token per latent of its 16x VAE, the same
    count."""
    return flux_sigmas(steps, image_seq_len, base_shift, max_shift, base_seq_len, max_seq_len,
                       schedule=schedule, shift_terminal=shift_terminal)


def flux_seq_len(height: int, width: int) -> int:
    """Packed image tokens for an image of ``height x width`` pixels (VAE /8, then 2x2 packing)."""
    return math.ceil(height / 16) * math.ceil(width / 16)


# FLUX.2's "empirical mu" (BFL ``compute_empirical_mu``, diffusers' Flux2 pipelines): mu is a line in the
# number of image tokens fitted at 10 and at 200 steps, interpolated linearly in the step count in between;
# past 4300 tokens (about 1088^2 pixels) only the 200-step line.
FLUX2_MU_10 = (8.73809524e-05, 1.89833333)  # (slope per token, intercept) at 10 steps
FLUX2_MU_200 = (0.00016927, 0.45666666)  # ... at 200 steps
FLUX2_MU_MAX_SEQ = 4300


def flux2_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's mu for ``image_seq_len`` target tokens ((H/16) * (W/16), references not counted)
    and ``steps`` steps: 2.02 for 1024^2 at 50 steps, 2.29 at 4 steps."""
    a2, b2 = FLUX2_MU_200
    m200 = a2 * image_seq_len + b2
    if image_seq_len > FLUX2_MU_MAX_SEQ:
        return float(m200)
    a1, b1 = FLUX2_MU_10
    m10 = a1 * image_seq_len + b1
    slope = (m200 - m10) / 190.0
    return float(slope * steps + m200 - 200.0 * slope)


def flux2_sigmas(steps: int, image_seq_len: int, schedule: str = "default") -> torch.Tensor:
    """FLUX.2 schedule: ``steps + 1`` float32 sigmas ending at 0, the exponential time shift
    (as FLUX.1's) of ``linspace(1, 1/steps, steps)`` with mu = ``flux2_mu(image_seq_len, steps)``;
    the scheduler config's shift settings play no part (the pipelines pass mu). ``schedule``
    re-spaces the steps (``respace``)."""
    _check(steps, schedule)
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    return _finish(time_shift(t, flux2_mu(image_seq_len, steps)), schedule)
