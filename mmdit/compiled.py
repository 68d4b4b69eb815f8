"""A transformer compiled for sampling: one graph per input shape, CUDA graphs on GPUs."""
from __future__ import annotations

import sys
import time

import torch

from .layers import row_indices


class CompiledTransformer:
    """Calls ``torch.compile(model, fullgraph=True)`` (``mode="reduce-overhead"``, i.e. CUDA
    graphs, on CUDA) in place of the model; everything else (``ma``, ``config``, parameters)
    is the model's own. The forward is one graph with the CFG+DG fork inside, so each shape
    (batch rows, latent size, text length, fork rows) compiles once; the first call at a new
    shape says so on stderr, with the time it took.
    """

    def __init__(self, model: torch.nn.Module, cuda_graphs: bool | None = None):
        self.model = model
        device = next(model.parameters()).device
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.fn = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
        self.shapes = set()

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, sigma, context, pooled, guidance=None, disrupt=None, fork=None, branches=(), **inputs):
        rows = [None if r is None else row_indices(r, x.shape[0], name)
                for r, name in ((disrupt, "disrupt"), (fork, "fork"))]  # the rows decide the graph
        key = (tuple(x.shape), tuple(context.shape), *rows, tuple(branches))
        kw = dict(guidance=guidance, disrupt=disrupt, fork=fork, branches=branches, **inputs)
        if self.cuda_graphs:  # a new step: the graph's previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.shapes:
            return self.fn(x, sigma, context, pooled, **kw)
        print(f"compiling the transformer for {x.shape[0]} rows of {tuple(x.shape[1:])} latents, "
              f"{context.shape[1]} text tokens (once per shape)...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = self.fn(x, sigma, context, pooled, **kw)
        print(f" {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        self.shapes.add(key)
        return out

