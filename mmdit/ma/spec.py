"""The MA disruption spec: which residual-stream channels, at which block, by how much."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MASpec:
    """Which residual-stream channels to disrupt, where, and how much.

    channels: MA channel indices of the hidden state (K,).
    block: 0-based global block index m; the disruption acts on the OUTPUT of block m
        (FLUX: double blocks 0..18, then single blocks 19..56).
    rho: factor for those channels (0 zeroes them); a number or a function of sigma.
    streams: which tokens are touched; ("image",) by default, ("image", "text") for both.
    token_mask: optional (N_image,) bool; only those image tokens are disrupted (local DG).

    Frozen: ``model.ma = spec`` checks it against the model and puts its tables on the
    model's device once; change it with ``model.ma = dataclasses.replace(model.ma, rho=0.5)``.
    """

    channels: tuple[int, ...]
    block: int
    rho: float | Callable[[torch.Tensor], torch.Tensor] = 0.0
    streams: tuple[str, ...] = ("image",)
    token_mask: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "streams", tuple(self.streams))
        bad = set(self.streams) - {"image", "text"}
        if bad or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of ('image', 'text'), got {self.streams}")

    def rho_for(self, sigma: torch.Tensor) -> float | torch.Tensor:
        """The factor for rows at noise levels ``sigma`` (n,): a number, or (n,) from a
        callable rho (computed on the device: no host sync)."""
        if not callable(self.rho):
            return float(self.rho)
        value = self.rho(sigma)
        return value.float().expand(sigma.shape[0]) if torch.is_tensor(value) else float(value)


def default_block(config) -> int:
    """The fork block m when none is given: FLUX block 28 of 57 (single block 9), SD3 the
    middle joint block (12 of 24), FLUX.2 the middle block (a single block: [dev] 28 of 56, single
    block 20; [klein] 4B 12 of 25, 9B 16 of 32), Qwen-Image the middle block too (1.0: 30 of 60,
    2.1: 16 of 32); scaled to the model's depth (our choice: docs/architecture.md)."""
    total = config.total_blocks
    m = (28 * total) // 57 if config.family == "flux" else total // 2
    return min(max(m, 0), total - 1)


# MA channels reported by the paper and its authors' code for the official checkpoints, at
# the default fork block: hints that the MA policy checks on the checkpoint first.
PAPER_CHANNELS: dict[str, tuple[int, ...]] = {
    "sd3-medium": (810,),
    "sd3.5-medium": (676,),
    "sd3.5-large": (676,),
    "flux.1-dev": (154, 1446),
}


def paper_channels(config) -> tuple[int, ...] | None:
    """The reported MA channels for a model whose config is an official preset's, else None."""
    from ..models.config import PRESETS

    for name, channels in PAPER_CHANNELS.items():
        if PRESETS[name] == config:
            return channels
    return None


def spec_to_json(spec: MASpec) -> dict:
    if callable(spec.rho):
        raise ValueError("a spec with a callable rho can't be saved; store a number")
    return {"channels": list(spec.channels), "block": spec.block, "rho": float(spec.rho),
            "streams": list(spec.streams)}


def spec_from_json(data: dict) -> MASpec:
    """The inverse of ``spec_to_json``."""
    return MASpec(channels=tuple(data["channels"]), block=data["block"], rho=data["rho"],
                  streams=tuple(data["streams"]))
