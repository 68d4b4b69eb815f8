"""diffusers VAE peers for FLUX.2 and Qwen-Image (random weights, tiny configs), the pipelines'
latent normalisation written as diffusers' pipelines write it, and writers for every layout.

Test-only (imports diffusers on first use: ``peers.diffusers()``). Used by tests/test_vae_flux2.py and tests/test_vae_qwen.py.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from helpers import save_safetensors
from mmdit.weights.wan_vae import wan_key
from peers import diffusers

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLQwenImage21

STD = 0.1  # noise on every float weight, so ones / zeros inits (RMS gammas, biases) don't hide wiring


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict(keep_vars=True).items()):
            if t.dtype.is_floating_point:
                t.add_(torch.randn(t.shape, generator=g) * STD)
    return model.eval()


def _stats(n: int, seed: int) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).tolist(), (0.5 + 2 * torch.rand(n, generator=g)).tolist()


def _flux2_pipeline():
    """diffusers' Flux2Pipeline class (its latent patchify helpers)."""
    diffusers()
    return importlib.import_module("diffusers.pipelines.flux2.pipeline_flux2").Flux2Pipeline


# --- FLUX.2 ---------------------------------------------------------------------------------------

def flux2_peer(channels=(32, 64, 64), latent=4, groups=32, seed=0) -> AutoencoderKLFlux2:
    """3 levels (channel change, shortcut, reversed up index), 2x2 patchify; bn statistics random.
    32 groups as the real VAE: GroupNorm groups cannot be read off a file without config.json."""
    torch.manual_seed(seed)
    n = len(channels)
    vae = diffusers().AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=channels, layers_per_block=1, latent_channels=latent,
                             norm_num_groups=groups, sample_size=32)
    _randomize(vae, seed)
    mean, var = _stats(4 * latent, seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor(mean))
        vae.bn.running_var.copy_(torch.tensor(var))
        vae.bn.num_batches_tracked.fill_(7)
    return vae


@torch.no_grad()
def flux2_encode(vae: AutoencoderKLFlux2, x: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline._encode_vae_image: posterior mode, 2x2 patchify, BatchNorm statistics."""
    z = _flux2_pipeline()._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (z - mean) / std


@torch.no_grad()
def flux2_decode(vae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline's decode (after unpacking the tokens): undo the statistics, unpatchify, decode."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(_flux2_pipeline()._unpatchify_latents(z * std + mean)).sample


# --- Qwen-Image 1.0 / 2.1 -------------------------------------------------------------------------

def qwen_peer(base=8, z=16, dim_mult=(1, 2, 4, 4), res=2, temporal=(False, True, True),
              seed=0) -> AutoencoderKLQwenImage:
    """The real layout shrunk: 4 stages and 2 resnets (what diffusers' Wan converter assumes), a decoder
    shortcut at Wan's upsamples.4; random latents_mean / latents_std."""
    torch.manual_seed(seed)
    mean, std = _stats(z, seed + 1)
    vae = diffusers().AutoencoderKLQwenImage(base_dim=base, z_dim=z, dim_mult=list(dim_mult), num_res_blocks=res,
                                 temperal_downsample=list(temporal), latents_mean=mean, latents_std=std)
    return _randomize(vae, seed)


def qwen21_peer(base=8, decoder_base=12, z=64, dim_mult=(1, 1, 1, 1, 1), res=1, temporal=(False, True, True, True),
                seed=0) -> AutoencoderKLQwenImage21:
    """The notes' tiny 2.1 config with the real z (so the preset statistics fit a config-less file)."""
    torch.manual_seed(seed)
    mean, std = _stats(z, seed + 1)
    vae = diffusers().AutoencoderKLQwenImage21(base_dim=base, decoder_base_dim=decoder_base, z_dim=z, dim_mult=list(dim_mult),
                                   num_res_blocks=res, temperal_downsample=list(temporal), latents_mean=mean,
                                   latents_std=std)
    return _randomize(vae, seed)


def _qwen_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1),
            torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))


@torch.no_grad()
def qwen_encode(vae, x: torch.Tensor) -> torch.Tensor:
    """The Qwen-Image pipelines: one frame, the posterior mean (2.1's argmax mode; 1.0's img2img samples
    instead), ``(z - latents_mean) / latents_std``; the frame axis dropped again."""
    mean, std = _qwen_stats(vae)
    return ((vae.encode(x[:, :, None]).latent_dist.mode() - mean) / std)[:, :, 0]


@torch.no_grad()
def qwen_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """The Qwen-Image pipelines' decode: ``z * latents_std + latents_mean``, one frame, ``[:, :, 0]``."""
    mean, std = _qwen_stats(vae)
    return vae.decode(z[:, :, None] * std + mean).sample[:, :, 0]


def qwen_arch(vae) -> str:
    return "qwen-image-2.1" if type(vae).__name__ == "AutoencoderKLQwenImage21" else "qwen-image"


def to_wan(vae, time_axis: bool = False) -> dict[str, torch.Tensor]:
    """The peer's state dict under Wan's original names (ComfyUI's files). ``time_axis``: give 4-D
    causal-conv weights a time axis of 1, as ComfyUI's Qwen-Image 2.1 file keeps them (the attention's
    and the resamplers' plain 2-D convs stay 4-D)."""
    arch, res = qwen_arch(vae), vae.config.num_res_blocks
    out = {}
    for k, v in vae.state_dict().items():
        name = wan_key(k, arch, res, "wan")
        assert name is not None, k
        plain_2d = any(p in k for p in (".resample.", ".to_qkv.", ".proj."))
        out[name] = v[:, :, None] if time_axis and v.ndim == 4 and not plain_2d and k.endswith("weight") else v
    return out


def save_wan(vae, path, prefix: str = "", time_axis: bool = False):
    return save_safetensors({prefix + k: v for k, v in to_wan(vae, time_axis).items()}, path)
