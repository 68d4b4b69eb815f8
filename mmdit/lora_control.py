"""BFL's FLUX.1 Depth / Canny Control LoRA: it turns FLUX.1-dev into the Depth / Canny model.

The file (``flux1-depth-dev-lora.safetensors``, ``flux1-canny-dev-lora.safetensors``) holds a
LoRA on every Linear in BFL's names (``lora_A`` / ``lora_B``, some with ``lora_B.bias``), an
``img_in`` LoRA that reads twice the input channels (the latents, then the control image's
latents), and the q / k RMSNorm scales of the Depth / Canny model in full. As diffusers'
``FluxControlPipeline.load_lora_weights`` does, applying it

* widens ``img_in`` with zero weights for the control channels and sets ``config.in_channels``
  (the pipeline then takes ``control_image=``),
* replaces the q / k norm scales by the file's (whatever the LoRA scale),
* applies the rest as a plain LoRA (alpha = rank; ``lora_B.bias`` added to the bias).

``remove()`` puts back ``img_in``, the config and the norm scales.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .fp8 import dequantize, set_module
from .weights.checkpoint import CheckpointError

NORMS = ("query_norm.scale", "key_norm.scale")  # the keys that tell a Control LoRA


def is_control(sd) -> bool:
    return any(k.endswith(NORMS) for k in sd)


def read(model: nn.Module, sd: dict, where: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, int]]:
    """(the LoRA part of ``sd``, our norm parameter -> its new value, our module -> its new input
    width), or one error saying why this model can't take it."""
    if model.config.family != "flux":
        raise CheckpointError(f"LoRA {where} is BFL's FLUX.1 Depth / Canny Control LoRA: it applies to FLUX.1-dev "
                              f"only, not to this {model.config.family} model")
    params = dict(model.named_parameters())
    norms = {k: v for k, v in sd.items() if k.endswith(NORMS)}
    bad = [k for k, v in norms.items() if k not in params or params[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"LoRA {where} is a FLUX.1 Control LoRA for another size of FLUX ({len(bad)} norm scales "
                              f"such as {bad[0]!r} don't fit this model): apply it to FLUX.1-dev")
    down = sd.get("img_in.lora_A.weight")
    widen = {}
    if down is not None and down.shape[1] != model.img_in.in_features:
        if down.shape[1] < model.img_in.in_features or down.shape[1] % 4:
            raise CheckpointError(f"LoRA {where}: its img_in reads {down.shape[1]} channels, this model's "
                                  f"{model.img_in.in_features}: a Control LoRA for another model")
        widen["img_in"] = down.shape[1]
    return {k: v for k, v in sd.items() if k not in norms}, norms, widen


class Widened:
    """What applying a Control LoRA changed outside its adapters, to put back on ``undo()``."""

    def __init__(self, model: nn.Module, widen: dict[str, int], norms: dict[str, torch.Tensor]):
        self.model, self.modules, self.config = model, {}, model.config
        self.norms = {k: dict(model.named_parameters())[k].detach().to("cpu", copy=True) for k in norms}
        for name, width in widen.items():
            old = model.get_submodule(name)
            weight = old.weight.detach()
            dense = weight.float() if getattr(old, "weight_scale", None) is None else \
                dequantize(weight, old.weight_scale, torch.float32)
            dtype = next(p.dtype for p in old.parameters() if p.dtype.is_floating_point and p.dtype.itemsize > 1)
            new = nn.Linear(width, old.out_features, bias=old.bias is not None, device=weight.device, dtype=dtype)
            with torch.no_grad():  # (out, in) -> (out, width): the control channels start at zero
                new.weight.copy_(torch.cat([dense, dense.new_zeros(dense.shape[0], width - dense.shape[1])], 1))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            new.requires_grad_(old.weight.requires_grad)
            self.modules[name] = old
            set_module(model, name, new)
        if "img_in" in widen:
            model.config = dataclasses.replace(self.config, in_channels=widen["img_in"],
                                               out_channels=self.config.out_channels)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in norms.items():
                params[k].copy_(v.to(params[k].dtype))

    def undo(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in self.norms.items():
                params[k].copy_(v)
        for name, old in self.modules.items():
            set_module(self.model, name, old)
        self.model.config = self.config
