"""Flow-matching ODE solvers over a sigma list: Euler, Heun and DPM++ 2M.

Each solver integrates ``dx/dsigma = v(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]``:

    velocity(x, sigma) -> v      float32 (B, C, H, W); one model evaluation (the guided velocity)
    x = done(step, sigma_next, x)    called once after every step (callbacks, progress); it may
                                     replace the latents (inpainting's blend)

The sigmas are Python floats, so every coefficient is a host number and a step issues no
device-to-host sync. Updates are computed in float32 and cast back to the latents' dtype
after every step (and before every model evaluation). No state outlives a call, and none
holds a model output across the next evaluation (a CUDA-graph replay may overwrite it).

Flow matching: ``x_sigma = sigma * noise + (1 - sigma) * x0`` and ``v = noise - x0``, so the
model's data prediction is ``x0 = x - sigma * v``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
StepDone = Callable[[int, float, torch.Tensor], torch.Tensor]


def euler(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float], done: StepDone) -> torch.Tensor:
    """First order: ``x <- x + (sigma_next - sigma) * v(x, sigma)``; one evaluation per step.

    (diffusers' FlowMatchEulerDiscreteScheduler.step.)
    """
    dtype = x.dtype
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = (x.float() + (sigma_next - sigma) * velocity(x, sigma)).to(dtype)
        x = done(i, sigma_next, x)
    return x


def heun(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float], done: StepDone) -> torch.Tensor:
    """Heun's second-order method (the trapezoid rule; Karras et al. 2022, Algorithm 1):

        v = v(x, sigma);  x' = x + dt * v                        Euler predictor, dt = sigma_next - sigma
        x <- x + dt * (v + v(x', sigma_next)) / 2                 trapezoid corrector

    Two evaluations per step; the step to sigma 0 keeps the Euler predictor (one evaluation),
    as diffusers' FlowMatchHeunDiscreteScheduler does: 2N - 1 evaluations for N steps to 0.
    """
    dtype = x.dtype
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        dt = sigma_next - sigma
        xf = x.float()
        euler_step = dt * velocity(x, sigma)  # a new tensor: the next call may reuse the model's output buffer
        x = (xf + euler_step).to(dtype)
        if sigma_next != 0:
            x = (xf + 0.5 * (euler_step + dt * velocity(x, sigma_next))).to(dtype)
        x = done(i, sigma_next, x)
    return x


def _lambda(sigma: float) -> float:
    """Half the log-SNR in flow form, ``log(alpha / sigma)`` with ``alpha = 1 - sigma``: -inf at 1, +inf at 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def dpmpp_2m(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float], done: StepDone) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): multistep, on the data prediction.

    With ``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda``:

        x0 = x - sigma * v(x, sigma)
        D  = x0 + (x0 - x0_prev) * h / (2 * h_prev)              midpoint form; D = x0 on the first
                                                                  step and on the step to sigma 0
        x <- (sigma_next / sigma) * x + (alpha_next - alpha * sigma_next / sigma) * D

    (the second coefficient is ``-alpha_next * (e^-h - 1)`` without the logs, so sigma = 1 and
    sigma = 0 need no special case; with D = x0 the step is exactly Euler; after a step from
    sigma = 1, h_prev is infinite and the correction vanishes, as in diffusers). One evaluation per
    step. Equals diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", prediction_type="flow_prediction",
    use_flow_sigmas=True) run on the same sigmas.
    """
    dtype = x.dtype
    x0_prev, h_prev = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        xf = x.float()
        x0 = xf - sigma * velocity(x, sigma)
        h = _lambda(sigma_next) - _lambda(sigma)
        d = x0
        if x0_prev is not None and sigma_next > 0:
            d = x0 + (0.5 * h / h_prev) * (x0 - x0_prev)
        ratio = sigma_next / sigma if sigma > 0 else 1.0  # from sigma 0 (already clean): x stays
        x = (ratio * xf + ((1 - sigma_next) - (1 - sigma) * ratio) * d).to(dtype)
        x0_prev, h_prev = x0, h
        x = done(i, sigma_next, x)
    return x


SAMPLERS: dict[str, Callable[[Velocity, torch.Tensor, Sequence[float], StepDone], torch.Tensor]] = {
    "euler": euler, "dpmpp_2m": dpmpp_2m, "heun": heun}
