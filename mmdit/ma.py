"""Massive activations: the disruption spec (probe and calibration follow)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class MASpec:
    """Which residual-stream channels to disrupt, where, and how much.

    channels: MA channel indices of the hidden state (K,).
    block: 0-based global block index m; the disruption acts on the OUTPUT of block m
        (FLUX: double blocks 0..18, then single blocks 19..56).
    rho: factor for those channels (0 zeroes them); a number or a function of sigma.
    streams: which tokens are touched; ("image",) by default, ("image", "text") for both.
    token_mask: optional (N_image,) bool; only those image tokens are disrupted (local DG).
    """

    channels: tuple[int, ...]
    block: int
    rho: float | Callable[[torch.Tensor], torch.Tensor] = 0.0
    streams: tuple[str, ...] = ("image",)
    token_mask: torch.Tensor | None = None

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.streams = tuple(self.streams)
        bad = set(self.streams) - {"image", "text"}
        if bad or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of ('image', 'text'), got {self.streams}")

    def rho_for(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-row factor (n,) for rows at noise levels ``sigma`` (n,)."""
        value = self.rho(sigma) if callable(self.rho) else self.rho
        return torch.as_tensor(value, dtype=torch.float32, device=sigma.device).expand(sigma.shape[0])
