"""The flow-matching Euler sampler with batched CFG / Detail Guidance."""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from .guidance import Guidance, guided_velocity


def sample(model: Callable, noise: torch.Tensor | Sequence[int], sigmas: torch.Tensor | Sequence[float],
           cond: Mapping, uncond: Mapping | None = None, *, cfg: float = 1.0, dg: float = 0.0,
           cfg_interval: tuple[float, float] = (0.0, 1.0), dg_interval: tuple[float, float] = (0.0, 1.0),
           guidance: torch.Tensor | float | None = None, generator: torch.Generator | None = None,
           progress: bool = False, callback: Callable | None = None, grad: bool = False) -> torch.Tensor:
    """Integrate the flow-matching ODE with Euler steps over a sigma schedule.

    Algorithm (first-order Euler on the velocity field, REFERENCE.md 6.1): for each
    consecutive pair (sigma, sigma_next) of ``sigmas`` (1 -> ... -> 0),

        v = guided velocity at (x, sigma)                    one model call, see guidance.py
        x = x + (sigma_next - sigma) * v                     in float32, cast back to x's dtype

    with ``v = v_u + cfg * (v_c - v_u) + dg * (v_c - v_m)``: v_u from ``uncond``, v_c from
    ``cond``, v_m from the cond rows forked at the model's MA block (``model.ma``).

    noise: (B, C, H, W) initial latents at sigmas[0]; or a shape, drawn from ``generator``
        (standard normal, float32, on the CPU, so a seed gives the same noise on any device)
        and moved to the model's device.
    cond / uncond: {"context": (B|1, L, Dc), "pooled": (B|1, Dp)}; uncond is the negative prompt.
    cfg: classifier-free scale (1 = off); dg: Detail Guidance weight (0 = off).
    cfg_interval / dg_interval: inclusive sigma ranges where each term is computed.
    guidance: FLUX.1-dev's distilled guidance (a number or (B,)); None for the others.
    callback: called after every step as ``callback(step, sigma_next, latents)`` (UIs, trainers).
    grad: False (default) runs under ``torch.inference_mode()``: no autograd graph, even when
        the parameters require grad; True keeps autograd on for differentiable sampling.
    Returns the latents at sigmas[-1].

    A pure function of its arguments: no scheduler state; call it on ``sigmas[i:j + 1]`` to
    run steps i..j-1 only.
    """
    rule = Guidance(float(cfg), float(dg), tuple(cfg_interval), tuple(dg_interval))
    if rule.dg != 0.0 and getattr(model, "ma", True) is None:
        raise ValueError("dg needs the model's MA spec: run `mmdit calibrate-ma --model MODEL` once (it is "
                         "cached per checkpoint) or set model.ma = mmdit.MASpec(channels=..., block=...)")
    if uncond is None and rule.cfg != 1.0:
        warnings.warn(f"cfg={cfg} has no effect without uncond (the negative prompt's conditioning, a dict "
                      "with 'context' and 'pooled'): pass uncond=... or cfg=1", stacklevel=2)
    config = getattr(model, "config", None)
    if guidance is not None and config is not None and not getattr(config, "guidance_embed", False):
        warnings.warn(f"guidance={guidance} is FLUX.1-dev's distilled guidance; this {config.family} model "
                      "has no guidance embedding and ignores it (use cfg= for classifier-free guidance)",
                      stacklevel=2)
    if not isinstance(noise, torch.Tensor):
        noise = torch.randn(tuple(noise), generator=generator).to(_device_of(model))
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"sigmas needs at least 2 values (start and end), got {len(sigmas)}")
    with torch.inference_mode(not grad):
        return _euler(model, noise, sigmas, cond, uncond, rule, guidance, progress, callback)


def _device_of(model) -> torch.device:
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    return next(params, torch.empty(0)).device


def _euler(model, noise, sigmas, cond, uncond, rule, guidance, progress, callback):
    x = noise
    steps, start = len(sigmas) - 1, time.perf_counter()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v, _ = guided_velocity(model, x, sigma, cond, uncond, rule, guidance)
        x = (x.float() + (sigma_next - sigma) * v).to(noise.dtype)
        if callback is not None:
            callback(i, sigma_next, x)
        if progress:
            elapsed = time.perf_counter() - start
            print(f"\rstep {i + 1}/{steps}  sigma {sigma_next:.4f}  {elapsed:.1f}s", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return x
