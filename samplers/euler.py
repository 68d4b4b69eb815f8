"""``sample()``: batched CFG / Detail Guidance handed to a flow-matching solver (Euler, Heun, DPM++ 2M)."""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from ..checks import choice
from ..models.cache import parse as parse_cache
from .guidance import GuidanceState, guided_velocity, required_inputs, same_length
from .guide import Guidance
from .solvers import SAMPLERS


def sample(model: Callable, noise: torch.Tensor | Sequence[int], sigmas: torch.Tensor | Sequence[float],
           cond: Mapping, uncond: Mapping | None = None, *, guide: Guidance | None = None,
           guidance: torch.Tensor | float | None = None, generator: torch.Generator | None = None,
           progress: bool = False, callback: Callable | None = None, grad: bool = False,
           sampler: str = "euler", cache=None) -> torch.Tensor:
    """Integrate the flow-matching ODE over a sigma schedule with the solver ``sampler``.

    Algorithm (default: first-order Euler on the velocity field, docs/architecture.md "Schedules"): for each
    consecutive pair (sigma, sigma_next) of ``sigmas`` (1 -> ... -> 0),

        v = guided velocity at (x, sigma)                    one model call, see guidance.py
        x = x + (sigma_next - sigma) * v                     in float32, cast back to x's dtype

    with ``v = v_u + cfg * (v_c - v_u) + dg * (v_c - v_dg) + slg * (v_c - v_slg) + pag * (v_c - v_pag)``:
    v_u from ``uncond``, v_c from ``cond``, the others from copies of the cond rows that the
    model perturbs (guidance.py): v_dg MA-disrupted at the model's MA block (``model.ma``),
    v_slg with ``slg_layers`` skipped, v_pag with identity image attention in ``pag_layers``.

    noise: (B, C, H, W) initial latents at sigmas[0]; or a shape, drawn from ``generator``
        (standard normal, float32, on the CPU, so a seed gives the same noise on any device)
        and moved to the model's device.
    cond / uncond: the model's conditioning inputs by name, each (B|1, ...); SD3 / FLUX.1:
        {"context": (B|1, L, Dc), "pooled": (B|1, Dp)}. uncond is the negative prompt's. Texts
        of different lengths with a ``context_mask`` are padded to one (``same_length``).
    guide: every guidance setting (``Guidance(cfg=..., dg=..., slg=..., ...)``); None: none.
    guidance: a guidance-distilled model's guidance value (FLUX.1-dev's; a number or (B,)).
    callback: called after every step as ``callback(step, sigma_next, latents)`` (UIs, trainers);
        if it returns a tensor, that replaces the latents (inpainting's blend of the known region).
    sampler: "euler" (1 model call per step), "heun" (2 per step, 1 on the step to sigma 0) or
        "dpmpp_2m" (DPM++ 2M, multistep: 1 per step); see solvers.py. Every guidance term works
        with each: a solver only sees the guided velocity, one batched model call per evaluation.
    grad: False (default) runs under ``torch.inference_mode()``: no autograd graph, even when
        the parameters require grad; True keeps autograd on for differentiable sampling.
    cache: step caching, ``"fbcache:0.08"`` / ``"teacache:0.4"`` or a policy object
        (``mmdit.models.cache``): a step whose input to the middle blocks barely changed skips them
        and adds their cached residual; one state per call (nothing is shared between calls).
    Returns the latents at sigmas[-1].

    A pure function of its arguments: no scheduler state; call it on ``sigmas[i:j + 1]`` to
    run steps i..j-1 only (a multistep solver restarts its history at i).
    """
    solve = SAMPLERS[choice("sampler", sampler, tuple(SAMPLERS))]
    rule = Guidance() if guide is None else guide
    if not isinstance(rule, Guidance):
        raise ValueError(f"guide must be a mmdit.samplers.Guidance, got {type(rule).__name__}")
    missing = [k for k in required_inputs(model) if k not in cond]
    if missing:
        raise ValueError(f"cond needs the model's inputs {list(required_inputs(model))}; missing {missing}")
    if rule.dg != 0.0 and getattr(model, "ma", True) is None:
        raise ValueError("dg needs the model's MA spec: run `mmdit calibrate-ma --model MODEL` once (it is "
                         "cached per checkpoint) or set model.ma = mmdit.MASpec(channels=..., block=...)")
    cond, uncond = same_length(cond, uncond)  # texts of different lengths in one batch (padding masked)
    if uncond is None and rule.cfg != 1.0:
        warnings.warn(f"cfg={rule.cfg} has no effect without uncond (the negative prompt's conditioning, a dict "
                      "like cond): pass uncond=... or cfg=1", stacklevel=2)
    config = getattr(model, "config", None)
    if guidance is not None and config is not None and not getattr(config, "guidance_embed", False):
        warnings.warn(f"guidance={guidance} is FLUX.1-dev's distilled guidance; this {config.family} model has "
                      "no guidance embedding and ignores it (use cfg= for classifier-free guidance)", stacklevel=2)
        guidance = None
    if not isinstance(noise, torch.Tensor):
        noise = torch.randn(tuple(noise), generator=generator).to(_device_of(model))
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"sigmas needs at least 2 values (start and end), got {len(sigmas)}")
    state, first = GuidanceState(), sigmas[0]
    policy = parse_cache(cache)
    steps = None if policy is None else policy.start(sigmas, getattr(config, "family", None))

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if rule.cfg_zero_star and sigma == first:  # CFG-Zero*'s zero init: no model call
            return torch.zeros_like(x, dtype=torch.float32)
        if steps is not None:
            steps.at(sigma)
        return guided_velocity(model, x, sigma, cond, uncond, rule, guidance, state, steps)[0]

    report = _StepReport(len(sigmas) - 1, callback, progress)
    with torch.inference_mode(not grad):
        x = solve(velocity, noise, sigmas, report)
    report.close()
    return x


def _device_of(model) -> torch.device:
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    return next(params, torch.empty(0)).device


class _StepReport:
    """The solvers' per-step hook: the user's callback, then an optional progress line on stderr."""

    def __init__(self, steps: int, callback: Callable | None, progress: bool):
        self.steps, self.callback, self.progress = steps, callback, progress
        self.start = time.perf_counter()

    def __call__(self, i: int, sigma_next: float, x: torch.Tensor) -> torch.Tensor:
        if self.callback is not None:
            replaced = self.callback(i, sigma_next, x)
            x = replaced if torch.is_tensor(replaced) else x
        if self.progress:
            line = f"step {i + 1}/{self.steps}  sigma {sigma_next:.4f}  {time.perf_counter() - self.start:.1f}s"
            if sys.stderr.isatty():  # one line, updated in place
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
            elif (i + 1) % max(1, self.steps // 10) == 0 or i + 1 == self.steps:  # a log file: about ten lines
                print(line, file=sys.stderr, flush=True)
        return x

    def close(self) -> None:
        if self.progress and sys.stderr.isatty():
            print(file=sys.stderr)
