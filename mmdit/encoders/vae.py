"""The AutoencoderKL of SD3 / SD3.5 / FLUX.1 (16 latent channels) and FLUX.2 (32, patchified).

Module names are the original LDM / BFL ones (``encoder.down.{i}.block.{j}``, ``mid.attn_1``,
``decoder.up.{i}`` indexed by resolution level; FLUX.2 adds ``encoder.quant_conv``,
``decoder.post_quant_conv`` and ``bn.running_mean/var``), so ``ae.safetensors`` and the
``first_stage_model.*`` part of Stability files load without renaming; diffusers
checkpoints go through the key table in ``mmdit.weights.encoders``.

Every VAE of the project (also ``wan_vae`` / ``qwen21_vae``) speaks one contract:
``encode`` (B, in, H, W) in [-1, 1] -> posterior mean (B, latent_channels, H/d, W/d), d =
``config.downsample``; ``decode`` is its inverse; ``normalize`` / ``denormalize`` map between
those raw latents and the transformer's latent space (here ``scaling * (z - shift)``; FLUX.2:
per channel by the BatchNorm running statistics). FLUX.2's 2x2 patchify happens inside
``encode`` / ``decode``, so its latents are (B, 128, H/16, W/16) throughout.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16  # as the transformer sees them: z channels * patch_size**2 (FLUX.2: 32 * 4)
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per resolution level; len-1 down/upsamplings
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 1.5305  # SD3; FLUX 0.3611 (unused when batch_norm_eps is set)
    shift_factor: float = 0.0609  # SD3; FLUX 0.1159
    quant_conv: bool = False  # FLUX.2: 1x1 convs on the moments and on the latents
    patch_size: int = 1  # FLUX.2: 2, the z grid is 2x2-patchified into channels (c*4 + ph*2 + pw)
    batch_norm_eps: float | None = None  # FLUX.2: 1e-4; normalise by bn.running_mean / running_var

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad or not self.channels:
            raise ValueError(f"VAE channels {self.channels} must be non-empty multiples of "
                             f"norm_groups={self.norm_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"VAE layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.patch_size < 1 or self.latent_channels % self.patch_size ** 2:
            raise ValueError(f"VAE latent_channels={self.latent_channels} must be a multiple of "
                             f"patch_size**2 (patch_size={self.patch_size})")

    @property
    def z_channels(self) -> int:
        """Channels at the autoencoder's bottleneck, before the patchify (FLUX.2: 32)."""
        return self.latent_channels // self.patch_size ** 2

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD3/FLUX.1, 16 for FLUX.2)."""
        return 2 ** (len(self.channels) - 1) * self.patch_size


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd3": VAEConfig(),
    "flux": VAEConfig(scaling_factor=0.3611, shift_factor=0.1159),
    "flux2": VAEConfig(latent_channels=128, patch_size=2, quant_conv=True, batch_norm_eps=1e-4,
                       scaling_factor=1.0, shift_factor=0.0),
}


def vae_config(name: str, **overrides) -> VAEConfig:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
    return dataclasses.replace(VAE_PRESETS[name], **overrides)


def _norm(cfg: VAEConfig, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(x) if self.nin_shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections, residual."""

    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.norm = _norm(cfg, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(y[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, cfg: VAEConfig, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, c, c)
        self.attn_1 = AttnBlock(cfg, c) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(cfg, c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


def _level(blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    setattr(level, name, resample)
    return level


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):
            c_in = ch[max(i - 1, 0)]
            blocks = [ResnetBlock(cfg, c_in if j == 0 else ch[i], ch[i]) for j in range(cfg.layers_per_block)]
            self.down.append(_level(blocks, Downsample(ch[i]) if i < n - 1 else None, "downsample"))
        self.mid = Mid(cfg, ch[-1])
        self.norm_out = _norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.z_channels, 3, padding=1)  # mean ++ logvar
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if cfg.quant_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h) if self.quant_conv is not None else h


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.channels, len(cfg.channels)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.quant_conv else None
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[-1], 3, padding=1)
        self.mid = Mid(cfg, ch[-1])
        # up[i] works at resolution level i (as in LDM); it runs from i = n-1 down to 0
        self.up = nn.ModuleList()
        for i in range(n):
            c_in = ch[min(i + 1, n - 1)]
            blocks = [ResnetBlock(cfg, c_in if j == 0 else ch[i], ch[i]) for j in range(cfg.layers_per_block + 1)]
            self.up.append(_level(blocks, Upsample(ch[i]) if i > 0 else None, "upsample"))
        self.norm_out = _norm(cfg, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentStats(nn.Module):
    """FLUX.2's per-channel latent statistics (BFL / diffusers ``bn``: a BatchNorm2d without affine,
    only ever used in eval mode, so its two running buffers are all there is)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*p, h/p, w/p), channel c*p*p + ph*p + pw (BFL's rearrange)."""
    B, C, h, w = z.shape
    return z.view(B, C, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    B, C, h, w = z.shape
    return z.view(B, C // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // (p * p), h * p, w * p)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.bn = LatentStats(cfg.latent_channels) if cfg.batch_norm_eps is not None else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> posterior mean (B, latent_channels, H/d, W/d), unnormalised
        (FLUX.2: the 32-channel mean at H/8, patchified to 128 channels at H/16)."""
        mean = self.encoder(x)[:, : self.config.z_channels]
        p = self.config.patch_size
        return patchify(mean, p) if p > 1 else mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) unnormalised (``denormalize`` of the transformer's latents)
        -> (B, 3, d*h, d*w) in ~[-1, 1]."""
        p = self.config.patch_size
        return self.decoder(unpatchify(z, p) if p > 1 else z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (``encode``'s) -> the transformer's latent space."""
        if self.bn is None:
            return self.config.scaling_factor * (z - self.config.shift_factor)
        mean, std = self._stats()
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The transformer's latents -> raw latents for ``decode``."""
        if self.bn is None:
            return z / self.config.scaling_factor + self.config.shift_factor
        mean, std = self._stats()
        return (z.float() * std + mean).to(z.dtype)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, C, 1, 1) float32; std = sqrt(running_var + eps) as BFL and diffusers."""
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        return mean, torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.batch_norm_eps)
