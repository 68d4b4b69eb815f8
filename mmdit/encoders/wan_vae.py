"""Qwen-Image's VAE (diffusers ``AutoencoderKLQwenImage``): the Wan-2.1 video VAE, on single images.

Wan's VAE is built of causal 3-D convolutions: along time, a kernel of depth 3 sees the frame and
the two before it, with zeros in front of the first frame. An image is one frame, so only the last
temporal tap of each kernel ever meets data and the network is exactly a 2-D one whose weights
are those last taps (``w[:, :, -1]``). This file is that 2-D network; the loader
(``mmdit.weights.wan_vae``) takes the last tap of every 5-D weight.

Left out, because only video needs it: the temporal taps 0 and 1, the ``time_conv``s of the
temporal down/upsamplers (they act from the second frame on; the loader checks they are in the file
and drops them), the feature cache carrying frames between chunks, and tiling.

Module names are Qwen's official (diffusers) ones; ComfyUI's ``qwen_image_vae.safetensors`` (Wan's
original names) goes through the key table in ``mmdit.weights.wan_vae``. The layers here are shared
with Qwen-Image 2.1's VAE (``qwen21_vae``). The VAE contract is the one in ``mmdit.encoders.vae``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The Qwen-Image (= Wan 2.1) per-channel latent statistics, from its diffusers config.
QWEN_IMAGE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_IMAGE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class QwenImageVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # per stage; len-1 spatial downsamplings
    num_res_blocks: int = 2  # per encoder stage (the decoder has one more)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # video only: where time_conv weights sit
    in_channels: int = 3  # diffusers `input_channels`; also the decoder's output
    latents_mean: tuple[float, ...] = QWEN_IMAGE_MEAN
    latents_std: tuple[float, ...] = QWEN_IMAGE_STD

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_common(self)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample has {len(self.temporal_downsample)} entries; "
                             f"dim_mult {self.dim_mult} needs {len(self.dim_mult) - 1}")

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along each axis (8)."""
        return 2 ** (len(self.dim_mult) - 1)


def check_common(cfg) -> None:
    """Invariants both Qwen-Image VAE configs share, with the numbers in the message."""
    if not cfg.dim_mult or cfg.num_res_blocks < 1 or cfg.base_dim < 1:
        raise ValueError(f"VAE needs dim_mult (got {cfg.dim_mult}), num_res_blocks >= 1 (got "
                         f"{cfg.num_res_blocks}) and base_dim >= 1 (got {cfg.base_dim})")
    if not len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim:
        raise ValueError(f"latents_mean / latents_std have {len(cfg.latents_mean)} / {len(cfg.latents_std)} "
                         f"entries; z_dim is {cfg.z_dim}")
    if min(cfg.latents_std) <= 0:
        raise ValueError(f"latents_std must be positive, got {cfg.latents_std}")


QWEN_IMAGE_VAE_PRESETS: dict[str, QwenImageVAEConfig] = {"qwen-image": QwenImageVAEConfig()}


def qwen_image_vae_config(name: str, **overrides) -> QwenImageVAEConfig:
    if name not in QWEN_IMAGE_VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(QWEN_IMAGE_VAE_PRESETS)}")
    return dataclasses.replace(QWEN_IMAGE_VAE_PRESETS[name], **overrides)


# --- layers (shared with qwen21_vae) -------------------------------------------------------------

class RMSNorm(nn.Module):
    """Wan's RMS_norm: x / ||x||_channels * sqrt(C) * gamma (no bias, no eps beyond F.normalize's)."""

    def __init__(self, c: int):
        super().__init__()
        self.scale = c ** 0.5
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the channel norm in fp32 for half dtypes, as Wan / diffusers do
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = RMSNorm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = RMSNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a frame; q, k, v from one 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = RMSNorm(c)
        self.to_qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, HW, C) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        return x + self.proj(y[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """The spatial half of Wan's Resample: pad right/bottom + stride-2 conv, or nearest x2 + conv.
    ``temporal`` marks a video down/upsampler, whose ``time_conv`` weights only video uses."""

    def __init__(self, c: int, c_out: int, up: bool, temporal: bool):
        super().__init__()
        self.up, self.temporal = up, temporal
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(c, c_out, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c_out, 3, stride=2))
        c_time = 2 * c if up else c  # upsampling doubles the frames through the channels
        self.video_only = {"time_conv.weight": (c_time, c, 1, 1), "time_conv.bias": (c_time,)} if temporal else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c, c), ResidualBlock(c, c)])
        self.attentions = nn.ModuleList([AttentionBlock(c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# --- Qwen-Image 1.0 ---------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, cfg: QwenImageVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()  # flat: num_res_blocks resnets, then a Resample, per stage
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(c_in if j == 0 else c_out, c_out))
            if i < len(cfg.dim_mult) - 1:
                self.down_blocks.append(Resample(c_out, c_out, up=False, temporal=cfg.temporal_downsample[i]))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)  # mean ++ logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(h))))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, upsample: Resample | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c_in if j == 0 else c_out, c_out) for j in range(n)])
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: QwenImageVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal = tuple(reversed(cfg.temporal_downsample))
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            c_in = c_in // 2 if i > 0 else c_in  # each upsampler halves the channels
            up = Resample(c_out, c_out // 2, up=True, temporal=temporal[i]) if i < len(cfg.dim_mult) - 1 else None
            self.up_blocks.append(UpBlock(c_in, c_out, cfg.num_res_blocks + 1, up))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class QwenImageVAE(nn.Module):
    """encode / decode / normalize / denormalize as in ``mmdit.encoders.vae`` (latents unpacked,
    (B, 16, H/8, W/8)); the pipeline's per-channel ``(z - latents_mean) / latents_std``."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = self.parts(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)

    @staticmethod
    def parts(cfg) -> tuple[nn.Module, nn.Module]:
        return Encoder(cfg), Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior mean (B, z, H/d, W/d), unnormalised."""
        return self.quant_conv(self.encoder(x))[:, : self.config.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z, h, w) unnormalised -> (B, out_channels, d*h, d*w), clamped to [-1, 1] as diffusers does."""
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the transformer's: (z - latents_mean) / latents_std per channel."""
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z.float() * std + mean).to(z.dtype)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # two small tensors per call: normalize runs once per image, never inside the sampling loop
        cfg = self.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
        return mean, torch.tensor(cfg.latents_std, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)

    def video_only(self) -> dict[str, tuple[int, ...]]:
        """Names and (last-tap) shapes of the checkpoint tensors that only video uses."""
        return {f"{name}.{key}": shape for name, m in self.named_modules() if isinstance(m, Resample)
                for key, shape in m.video_only.items()}
