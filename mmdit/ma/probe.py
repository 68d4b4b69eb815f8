"""The MA probe: per block, per stream, per channel |h| at the output of every block.

It records the residual stream after each block's last gated residual add, where the
disruption acts (docs/architecture.md, "Massive activations"), through ``model.taps``: the
row planner hands every block's last residual (``BlockRows.residual``) to the taps with its
stream name and gate, so nothing here knows a block's insides.

A sample is ``(x, sigma, *inputs)`` and an optional trailing dict of named inputs, as the
model takes them: ``(x, sigma, context, pooled[, guidance])`` for SD3 / FLUX.1,
``(x, sigma, {"context": c, "context_mask": m})`` for a family with a text mask.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Activations:
    """Residual-stream magnitudes at the output of every block, for one forward call.

    Each tensor is (K blocks, B rows, D channels), float32, on the CPU:
    image_mean / image_max: mean and max over image tokens of |h|; image_signed: mean of h.
    text_mean / text_max: the same over text tokens (NaN where a block has no text output).
    gate: the adaLN gate alpha of the image stream's last residual (the MLP's; FLUX single: the block's).
    sigma: (B,) the rows' noise levels.
    """

    image_mean: torch.Tensor
    image_max: torch.Tensor
    image_signed: torch.Tensor
    text_mean: torch.Tensor
    text_max: torch.Tensor
    gate: torch.Tensor
    sigma: torch.Tensor

    def rows(self, index) -> Activations:
        """The same record for a subset of rows (a slice, a mask or indices)."""
        pick = {f: getattr(self, f)[:, index] for f in ("image_mean", "image_max", "image_signed",
                                                         "text_mean", "text_max", "gate")}
        return Activations(**pick, sigma=self.sigma[index])


def _stats(t: torch.Tensor) -> list[torch.Tensor]:
    a = t.detach().float().abs()
    return [a.mean(1).cpu(), a.amax(1).cpu(), t.detach().float().mean(1).cpu()]


class Probe:
    """``with Probe(model) as probe: model(...)`` appends one ``Activations`` per forward call
    to ``probe.records``. Calls with ``fork`` are not supported (blocks after m have more rows)."""

    def __init__(self, model: nn.Module):
        self.model, self.records, self._handles = model, [], []
        self._current: dict | None = None

    def __enter__(self) -> Probe:
        self._handles = [self.model.register_forward_pre_hook(self._start, with_kwargs=True),
                         self.model.register_forward_hook(self._finish)]
        self.model.taps.append(self._tap)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.taps.remove(self._tap)

    def _start(self, module, args, kwargs):
        if kwargs.get("fork") is not None:
            raise ValueError("the MA probe records plain or `disrupt` calls; `fork` changes the row count")
        x = args[0] if args else kwargs["x"]
        sigma = args[1] if len(args) > 1 else kwargs["sigma"]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        self._current = {"sigma": sigma.detach().cpu().clone(), "image": {}, "text": {}, "gate": {}}

    def _tap(self, block: int, stream: str, out: torch.Tensor, gate: torch.Tensor, text_len: int) -> None:
        cur = self._current
        if stream == "joint":
            cur["text"][block] = _stats(out[:, :text_len])[:2]
            out, stream = out[:, text_len:], "image"
        if stream == "image":
            cur["image"][block] = _stats(out)
            cur["gate"][block] = gate.detach().float().cpu()
        else:
            cur["text"][block] = _stats(out)[:2]

    def _finish(self, module, args, out):
        cur, K = self._current, self.model.config.total_blocks
        image = [torch.stack([cur["image"][k][i] for k in range(K)]) for i in range(3)]
        nan = torch.full_like(image[0][0], float("nan"))
        text = [torch.stack([cur["text"].get(k, (nan, nan))[i] for k in range(K)]) for i in range(2)]
        gate = torch.stack([cur["gate"][k] for k in range(K)])
        self.records.append(Activations(*image, *text, gate=gate, sigma=cur["sigma"]))
        self._current = None


def named_inputs(model: nn.Module, inputs: Sequence, named: Mapping | None = None) -> dict:
    """The model's conditioning as keywords: positional ``inputs`` named after its ``velocity``'s
    parameters (after x and sigma), then ``named``."""
    params = [p for p in inspect.signature(model.velocity).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]
    if len(inputs) > len(params):
        raise ValueError(f"{len(inputs)} conditioning inputs for a model that takes {[p.name for p in params]}")
    return {**{p.name: v for p, v in zip(params, inputs)}, **(named or {})}


def unpack(model: nn.Module, sample) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A sample ``(x, sigma, *inputs[, named])`` -> (x, sigma (B,) on x's device, keyword inputs)."""
    if len(sample) < 3:
        raise ValueError(f"a sample is (x, sigma, *inputs[, named inputs]); got {len(sample)} values")
    x, sigma, *rest = sample
    named = rest.pop() if rest and isinstance(rest[-1], Mapping) else {}
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    return x, sigma, named_inputs(model, rest, named)


@torch.no_grad()
def probe(model: nn.Module, x, sigma, *inputs, disrupt=None, **named) -> Activations:
    """One forward call of ``model`` with the probe attached (inputs as the model takes them)."""
    with Probe(model) as p:
        model(x, sigma, *inputs, disrupt=disrupt, **named)
    return p.records[0]


@torch.no_grad()
def channel_ratios(model: nn.Module, sample, channels: Sequence[int], block: int) -> list[float]:
    """One forward: each channel's mean |h| over image tokens at the output of ``block``, over
    the block's median channel (the ``select_massive`` statistic)."""
    x, sigma, inputs = unpack(model, sample)
    mag = probe(model, x, sigma, **inputs).image_mean[block].mean(0)  # (D,)
    median = mag.median().clamp_min(1e-12)
    return [(mag[c] / median).item() for c in channels]
