"""Flow-matching training support for the MMDiT transformers: what a trainer imports.

The pieces work in any trainer (they only need ``model(x, sigma, context, pooled)``):

    x_t = sigma * noise + (1 - sigma) * x0          the rectified-flow path (sigma = 1: pure noise)
    v   = noise - x0                                the velocity the model predicts
    loss = mean (model(x_t, sigma, c) - v)^2        sigma ~ logit-normal (SD3) or uniform, SD3-shifted

``flow_matching_loss`` computes it; ``checkpoint_blocks`` / ``compile_blocks`` wrap each
transformer block from the outside (state-dict keys unchanged); ``EMA`` keeps an average;
``distribute`` wraps a module for DDP or FSDP2. Gradients flow through every fused kernel
(each has an autograd.Function). The recipe of the shipped tiny model (``mmdit train``) is
``mmdit.tiny.recipe``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora import inject_lora, save_lora  # noqa: F401  LoRA training: inject, optimize handle.parameters(), save


# ---------------------------------------------------------------------------------------------
# The objective

def sample_sigma(n: int, *, mode: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 shift: float = 1.0, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Training noise levels (n,) in (0, 1): ``sigmoid(N(mean, std))`` (SD3's logit-normal) or
    ``U(0, 1)``, then SD3's time shift ``s*t / (1 + (s-1)*t)`` (s > 1 favours high noise)."""
    if mode == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif mode == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"sigma mode {mode!r}: use 'logit_normal' or 'uniform'")
    return (shift * t / (1 + (shift - 1) * t)).to(device)


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, *,
                       sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, sigma_mode: str = "logit_normal",
                       sigma_std: float = 1.0, shift: float = 1.0, **model_kwargs) -> torch.Tensor:
    """Mean squared velocity error on one batch; x0: (B, C, H, W) clean latents or pixels.

    sigma (B,) and noise (like x0) are drawn from ``generator`` unless given (give them to
    reproduce a step exactly, e.g. across data-parallel ranks); ``model_kwargs`` go to the
    model (FLUX.1-dev: ``guidance=``).
    """
    B = x0.shape[0]
    if sigma is None:
        sigma = sample_sigma(B, mode=sigma_mode, std=sigma_std, shift=shift, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    s = sigma.to(x0.dtype).view(B, *([1] * (x0.dim() - 1)))
    x_t = s * noise + (1 - s) * x0
    v = model(x_t, sigma, context, pooled, **model_kwargs)
    return F.mse_loss(v.float(), (noise - x0).float())


# ---------------------------------------------------------------------------------------------
# Wrapping blocks from the outside (no change to the modules or their state-dict keys)

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a transformer, in order."""
    return model.blocks()


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Activation checkpointing per block: each block's activations are recomputed in the
    backward instead of stored. ``enabled=False`` undoes it. Returns ``model``."""
    for block in transformer_blocks(model):
        if "forward" in block.__dict__:  # already wrapped: unwrap first
            del block.forward
        if enabled:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` each block (``nn.Module.compile``: one graph, reused by blocks of the
    same kind); ``options`` go to torch.compile (``backend=``, ``mode=``...). Returns ``model``."""
    for block in transformer_blocks(model):
        block.compile(**options)
    return model


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so an
    early average is not stuck at the initialisation.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})


def distribute(module: nn.Module, mode: str = "ddp", blocks: Sequence[nn.Module] = ()) -> nn.Module:
    """Wrap for data parallelism over the default process group (``init_process_group`` first).

    ddp:  ``DistributedDataParallel`` (gradients all-reduced, averaged over ranks), with
          ``find_unused_parameters``: the last SD3 block's text stream is ``pre_only`` and its
          ln_q (SD3.5) gets no gradient.
    fsdp: FSDP2 -- ``fully_shard`` on each of ``blocks``, then on the root module; parameters
          become DTensors sharded on dim 0 (``param.full_tensor()`` gathers one).
    """
    import torch.distributed as dist

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = next(module.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"distributed mode {mode!r}: use 'ddp' or 'fsdp'")
