"""A transformer compiled for sampling: the whole model as one graph per input shape (CUDA graphs
on GPUs), or regionally, one compiled block of each kind reused by every block of that kind."""
from __future__ import annotations

import sys
import time

import torch

from .denoiser import Denoiser
from .models.rows import row_indices


class CompiledTransformer(Denoiser):
    """Calls ``torch.compile(model, fullgraph=True)`` (``mode="reduce-overhead"``, i.e. CUDA
    graphs, on CUDA) in place of the model; everything else (``ma``, ``config``, parameters)
    is the model's own. The forward is one graph with the CFG+DG fork inside, so each shape
    (batch rows, latent size, text length, fork rows) compiles once; the first call at a new
    shape says so on stderr, with the time it took.
    """

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool | None = None, **options):
        """``options`` go to torch.compile (``backend=``, ...)."""
        super().__init__(model)
        device = next(model.parameters()).device
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.fn = torch.compile(model, fullgraph=True, dynamic=False, mode=mode, **options)
        self.shapes = set()

    def __call__(self, x, sigma, *inputs, disrupt=None, fork=None, branches=(), **named):
        rows = [None if r is None else row_indices(r, x.shape[0], name)
                for r, name in ((disrupt, "disrupt"), (fork, "fork"))]  # the rows decide the graph
        tensors = [t for v in (*inputs, *named.values()) for t in (v if isinstance(v, tuple) else (v,))]
        shapes = tuple(tuple(t.shape) for t in tensors if torch.is_tensor(t))
        plan = tuple((b.source.indices(x.shape[0]), b.perturbation) for b in branches)  # slices hash from 3.12 only
        key = (tuple(x.shape), shapes, *rows, plan)
        kw = dict(disrupt=disrupt, fork=fork, branches=branches, **named)
        if self.cuda_graphs:  # a new step: the graph's previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.shapes:
            return self.fn(x, sigma, *inputs, **kw)
        text = next((t.shape[1] for t in tensors if torch.is_tensor(t) and t.dim() == 3), 0)
        print(f"compiling the transformer for {x.shape[0]} rows of {tuple(x.shape[1:])} latents, "
              f"{text} text tokens (once per shape)...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = self.fn(x, sigma, *inputs, **kw)
        print(f" {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        self.shapes.add(key)
        return out


COMPILE_MODES = (False, True, "regional")


def compile_mode(value) -> bool | str:
    """``compile=`` checked: False, True (the whole model) or "regional" (block by block)."""
    if value not in COMPILE_MODES or (value is not True and value is not False and not isinstance(value, str)):
        raise ValueError(f"compile must be False, True or 'regional', got {value!r}")
    return value


def compile_regional(model: torch.nn.Module, **options) -> torch.nn.Module:
    """Compile every block in place (``nn.Module.compile``, fullgraph): blocks of one kind share the
    compiled code (their weights are inputs of the graph), so a 24-block model compiles about one
    block per kind, and per variant (the DG fork block, SLG / PAG rows) once. The row planning between
    blocks stays eager. Returns ``model``; ``options`` go to torch.compile."""
    for block in model.blocks():
        block.compile(fullgraph=True, dynamic=False, **options)
    return model
