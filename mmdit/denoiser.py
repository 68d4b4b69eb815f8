"""The base of the wrappers around a transformer's calls (compiled, conditioned, over several ranks).

A wrapper is called like the model, ``wrapper(x, sigma, *inputs, **named)``, and is otherwise
the model: every other attribute (``config``, ``ma``, ``parameters`` ...) is the wrapped one's.
Wrappers stack: ``BranchParallel(SequenceParallel(CompiledTransformer(model)))``.
"""
from __future__ import annotations


class Denoiser:
    """Calls go to ``self.model`` (override ``__call__`` to change them); attributes fall through."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, x, sigma, *inputs, **named):
        return self.model(x, sigma, *inputs, **named)
