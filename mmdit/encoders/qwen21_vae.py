"""Qwen-Image 2.1's VAE (diffusers ``AutoencoderKLQwenImage21``): Wan-2.2's residual VAE made 2-D.

RGBA in and out, 64 latent channels at 1/16 of the image size. Each encoder stage adds to its
resnets a parameter-free shortcut that folds 2x2 pixels (and, on a temporal stage, two frames) into
channels and averages groups of them; each decoder stage adds the mirror image, which repeats
channels and unfolds them into 2x2 pixels (and frames). On one image the "previous frame" of a
temporal stage is the zero padding, and the decoder keeps only the last frame it unfolds: both
shortcuts are written here for exactly that case. The convolutions are 2-D already (diffusers keeps
Wan's 3-D names); ``time_conv``s are video only, as in ``wan_vae``, whose layers this file reuses.

Module names are Qwen's official (diffusers) ones; ComfyUI's file (Wan-2.2 names, convs with a time
axis of 1) goes through ``mmdit.weights.wan_vae``. The VAE contract is the one in ``mmdit.encoders.vae``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .wan_vae import MidBlock, QwenImageVAE, Resample, ResidualBlock, RMSNorm, check_common

# The Qwen-Image 2.1 per-channel latent statistics, from its diffusers config.
QWEN_IMAGE_21_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
    0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
    0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
    0.5547, -1.7121, -0.1562, 0.0304)
QWEN_IMAGE_21_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904,
    2.8778, 3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075,
    3.2700, 3.4767, 2.8063, 5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490,
    3.7662, 3.6746, 3.4563, 3.8161)


@dataclass(frozen=True)
class QwenImage21VAEConfig:
    base_dim: int = 96
    decoder_base_dim: int = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)  # per stage; len-1 spatial downsamplings
    num_res_blocks: int = 2  # per encoder stage (the decoder has one more)
    temporal_downsample: tuple[bool, ...] = (False, True, True, True)  # folds two frames in the shortcut
    in_channels: int = 4  # RGBA
    out_channels: int = 4
    latents_mean: tuple[float, ...] = QWEN_IMAGE_21_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_21_STD

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_common(self)
        n = len(self.dim_mult)
        if len(self.temporal_downsample) != n - 1:
            raise ValueError(f"temporal_downsample has {len(self.temporal_downsample)} entries; "
                             f"dim_mult {self.dim_mult} needs {n - 1}")
        enc = [self.base_dim * m for m in (1, *self.dim_mult)]
        dec = [self.decoder_base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]
        for i in range(n):  # the shortcuts regroup channels: the sizes must divide
            down, up = self.shortcut_factors(i, decoder=False), self.shortcut_factors(i, decoder=True)
            if enc[i] * down % enc[i + 1] or (up and dec[i + 1] * up % dec[i]):
                raise ValueError(f"stage {i}: encoder {enc[i]} -> {enc[i + 1]} channels (x{down} folded) or decoder "
                                 f"{dec[i]} -> {dec[i + 1]} (x{up} unfolded) do not divide; change base_dim / dim_mult")

    def shortcut_factors(self, i: int, decoder: bool) -> int:
        """Frames x pixels folded by stage i's shortcut (encoder) or unfolded (decoder; 0: no shortcut)."""
        n = len(self.dim_mult)
        last = i == n - 1
        temporal = self.temporal_downsample[n - 2 - i if decoder else i] if not last else False
        if decoder and last:
            return 0
        return (2 if temporal else 1) * (1 if last else 4)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along each axis (16)."""
        return 2 ** (len(self.dim_mult) - 1)


QWEN_IMAGE_21_VAE_PRESETS: dict[str, QwenImage21VAEConfig] = {"qwen-image-2.1": QwenImage21VAEConfig()}


def qwen_image_21_vae_config(name: str, **overrides) -> QwenImage21VAEConfig:
    if name not in QWEN_IMAGE_21_VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(QWEN_IMAGE_21_VAE_PRESETS)}")
    return dataclasses.replace(QWEN_IMAGE_21_VAE_PRESETS[name], **overrides)


class FoldDown(nn.Module):
    """Wan-2.2's AvgDown3D on one frame: fold (frames ft, fs x fs pixels) into channels in the order
    c, t, sh, sw, with the ft-1 frames before the image zero, then average groups of channels."""

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int):
        super().__init__()
        self.c_out, self.ft, self.fs = c_out, ft, fs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        fs, h, w = self.fs, H // self.fs, W // self.fs
        x = x.view(B, C, 1, h, fs, w, fs).permute(0, 1, 2, 4, 6, 3, 5)  # (B, C, 1, fs, fs, h, w)
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 0, self.ft - 1, 0))  # (B, C, ft, fs, fs, h, w): zero frames first
        return x.reshape(B, self.c_out, -1, h, w).mean(2)


class UnfoldUp(nn.Module):
    """Wan-2.2's DupUp3D on the first chunk: repeat channels, unfold them into (ft frames, fs x fs
    pixels) and keep the last frame (the first ft-1 are dropped for the first chunk)."""

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int):
        super().__init__()
        self.c_out, self.ft, self.fs = c_out, ft, fs
        self.repeats = c_out * ft * fs * fs // c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        fs = self.fs
        x = x.repeat_interleave(self.repeats, dim=1).view(B, self.c_out, self.ft, fs, fs, h, w)[:, :, -1]
        return x.permute(0, 1, 4, 2, 5, 3).reshape(B, self.c_out, h * fs, w * fs)  # (B, c_out, h fs, w fs)


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, down: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(n)])
        self.downsampler = Resample(c_out, c_out, up=False, temporal=temporal) if down else None
        self.avg_shortcut = FoldDown(c_in, c_out, 2 if temporal else 1, 2 if down else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.resnets:
            h = block(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, up: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(n)])
        self.upsampler = Resample(c_out, c_out, up=True, temporal=temporal) if up else None
        self.avg_shortcut = UnfoldUp(c_in, c_out, 2 if temporal else 1, 2) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.resnets:
            h = block(h)
        if self.upsampler is None:
            return h
        return self.upsampler(h) + self.avg_shortcut(x)


class Encoder(nn.Module):
    def __init__(self, cfg: QwenImage21VAEConfig):
        super().__init__()
        dims, n = [cfg.base_dim * m for m in (1, *cfg.dim_mult)], len(cfg.dim_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, down=i < n - 1,
                      temporal=i < n - 1 and cfg.temporal_downsample[i]) for i in range(n))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)  # mean ++ logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: QwenImage21VAEConfig):
        super().__init__()
        dims, n = [cfg.decoder_base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))], len(cfg.dim_mult)
        temporal = tuple(reversed(cfg.temporal_downsample))
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, up=i < n - 1, temporal=i < n - 1 and temporal[i])
            for i in range(n))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class QwenImage21VAE(QwenImageVAE):
    """Qwen-Image 1.0's VAE with these encoder / decoder: the same quant convs, the same per-channel
    normalisation; RGBA (B, 4, H, W) <-> latents (B, 64, H/16, W/16)."""

    @staticmethod
    def parts(cfg) -> tuple[nn.Module, nn.Module]:
        return Encoder(cfg), Decoder(cfg)
