"""Text to image: text encoders -> transformer sampled with CFG / DG -> VAE decoder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .compiled import CompiledTransformer
from .lora import apply_lora
from .samplers import flux_sigmas, sample, sd3_sigmas
from .tokenizers import load_tokenizer
from .weights.checkpoint import CheckpointError, read_json
from .weights.encoders import load_text_encoder, load_vae
from .weights.hub import REPO_ID
from .weights.transformer import load_transformer

# The diffusers pipelines' defaults (REFERENCE.md 4.3, 4.4).
DEFAULTS = {"sd3": dict(steps=28, cfg=7.0, max_sequence_length=256, size=1024),
            "flux": dict(steps=28, cfg=1.0, guidance=3.5, max_sequence_length=512, size=1024)}
PIPELINE_FILES = ["model_index.json", "scheduler/*", "transformer/*", "vae/*", "text_encoder*/*", "tokenizer*/*"]


@dataclass
class SD3Text:
    """CLIP-L + CLIP-G penultimate states zero-padded to the T5 width, then T5; pooled = both projections."""

    tokenizers: tuple  # clip_l, clip_g, t5 (or None)
    encoders: tuple
    context_dim: int

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict:
        (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = self.tokenizers, self.encoders
        out_l, out_g = clip_l(_ids(tok_l, prompts, 77, clip_l)), clip_g(_ids(tok_g, prompts, 77, clip_g))
        clip = torch.cat([out_l.penultimate, out_g.penultimate], dim=-1)  # (B, 77, 768 + 1280)
        if t5 is None:  # as diffusers: zeros in place of the T5 states
            t5_states = clip.new_zeros(len(prompts), max_sequence_length, self.context_dim)
        else:
            t5_states = t5(_ids(tok_t5, prompts, max_sequence_length, t5))
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"context": torch.cat([clip, t5_states.to(clip.dtype)], dim=1),
                "pooled": torch.cat([_projected(out_l), _projected(out_g)], dim=-1)}


@dataclass
class FluxText:
    """T5 states as context; CLIP-L pooled output (no projection) as the pooled vector."""

    tokenizers: tuple  # clip_l, t5
    encoders: tuple

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict:
        (tok_l, tok_t5), (clip_l, t5) = self.tokenizers, self.encoders
        pooled = clip_l(_ids(tok_l, prompts, 77, clip_l)).pooled
        return {"context": t5(_ids(tok_t5, prompts, max_sequence_length, t5)), "pooled": pooled}


def _ids(tokenizer, prompts, length, encoder) -> torch.Tensor:
    return tokenizer(prompts, length).to(next(encoder.parameters()).device)


def _projected(out):
    return out.projected if out.projected is not None else out.pooled


@dataclass(frozen=True)
class PixelConfig:
    latent_channels: int = 3
    downsample: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


class PixelSpace:
    """The "VAE" of a pixel-space model: latents are the image in [-1, 1]."""

    def __init__(self, channels: int = 3):
        self.config = PixelConfig(latent_channels=channels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Pipeline:
    """``images = pipe(prompt, negative_prompt="", steps=28, cfg=..., dg=..., seed=0)``."""

    def __init__(self, transformer, text, vae, family: str, scheduler: dict | None = None,
                 defaults: dict | None = None, compile: bool = False):
        """``compile=True``: sample with the transformer compiled as one graph per shape
        (``torch.compile(fullgraph=True)``; CUDA graphs on CUDA): the first call at a new size
        compiles (seconds to minutes), later ones are faster."""
        self.transformer, self.text, self.vae = transformer, text, vae
        self.denoiser = CompiledTransformer(transformer) if compile else transformer
        self.family = family
        self.scheduler = scheduler or {}
        self.defaults = {**DEFAULTS[family], **(defaults or {})}

    @classmethod
    def tiny(cls, folder: str | os.PathLike | None = None, device="cpu", compile: bool = False) -> Pipeline:
        """The project's own small pixel-space model (default: the one shipped in the package)."""
        from .tiny import load_tiny

        tiny = load_tiny(folder, device=device)
        s = tiny.settings
        return cls(tiny.transformer, lambda prompts, _: tiny.conditioner.encode(prompts), PixelSpace(s.channels),
                   "sd3", {"shift": s.shift}, dict(steps=s.steps, cfg=s.cfg, dg=s.dg, size=s.size), compile)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", *,
                        text_device=None, revision: str | None = None, token=None,
                        compile: bool = False, lora: list[tuple] | None = None,
                        weight_dtype: torch.dtype | None = None) -> Pipeline:
        """An SD3 / SD3.5 / FLUX diffusers repo id or folder (model_index.json + components).

        ``text_device``: where the text encoders run (default: ``device``); "cpu" keeps
        them off the GPU. ``lora``: ``[(path or state dict, scale), ...]`` applied to the
        transformer (``mmdit.apply_lora``, unfused). ``weight_dtype=torch.float8_e4m3fn``:
        the transformer's Linear weights stay fp8 (see ``load_transformer``).
        """
        root = _pipeline_folder(source, revision, token)
        index = read_json(root / "model_index.json")
        transformer = load_transformer(root / "transformer", dtype=dtype, device=device, weight_dtype=weight_dtype)
        for path, scale in lora or ():
            apply_lora(transformer, path, scale)
        family = transformer.config.family
        text_device = text_device or device
        names = ["text_encoder", "text_encoder_2", "text_encoder_3"] if family == "sd3" else \
            ["text_encoder", "text_encoder_2"]
        tokenizers, encoders = [], []
        for i, name in enumerate(names):
            tok_name = name.replace("text_encoder", "tokenizer")
            present = index.get(name, [None])[0] is not None and (root / name).is_dir()
            if not present and name == "text_encoder_3":  # SD3 without T5
                tokenizers.append(None), encoders.append(None)
                continue
            if not present:
                raise CheckpointError(f"{root} has no {name}/ (the {family} pipeline needs it)")
            tokenizers.append(load_tokenizer(root / tok_name))
            encoders.append(load_text_encoder(root / name, dtype=dtype, device=text_device))
        if family == "sd3":
            text = SD3Text(tuple(tokenizers), tuple(encoders), transformer.config.context_dim)
        else:
            text = FluxText(tuple(tokenizers), tuple(encoders))
        vae = load_vae(root / "vae", dtype=dtype, device=device, family=family)
        scheduler = read_json(root / "scheduler" / "scheduler_config.json") or {}
        return cls(transformer, text, vae, family, scheduler, compile=compile)

    # --- pieces, usable on their own --------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int | None = None) -> dict:
        cond = self.text(prompts, max_sequence_length or self.defaults["max_sequence_length"])
        device, dtype = _where(self.transformer)
        return {k: v.to(device=device, dtype=dtype) for k, v in cond.items()}

    def sigmas(self, steps: int, latent_h: int, latent_w: int) -> torch.Tensor:
        """The schedule the diffusers pipeline would use with this scheduler config."""
        s = self.scheduler
        if self.family == "flux" or s.get("use_dynamic_shifting"):
            return flux_sigmas(steps, (latent_h // 2) * (latent_w // 2),
                               base_shift=s.get("base_shift", 0.5), max_shift=s.get("max_shift", 1.15),
                               base_seq_len=s.get("base_image_seq_len", 256),
                               max_seq_len=s.get("max_image_seq_len", 4096),
                               shift=s.get("use_dynamic_shifting", True))
        return sd3_sigmas(steps, shift=s.get("shift", 3.0))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a height x width image; a clear error for bad sizes."""
        down = self.vae.config.downsample
        multiple = down * getattr(self.transformer.config, "patch_size", 2)  # FLUX packs 2x2
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}; "
                             f"try {max(multiple, height - height % multiple)}x{max(multiple, width - width % multiple)}")
        return self.vae.config.latent_channels, height // down, width // down

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + cfg.shift_factor
        return (self.vae.decode(z).float() / 2 + 0.5).clamp(0, 1)

    # --- the whole thing --------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int | None = None,
                 cfg: float | None = None, dg: float | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int | None = None, latents: torch.Tensor | None = None,
                 max_sequence_length: int | None = None, output: str = "pil",
                 cfg_interval=(0.0, 1.0), dg_interval=(0.0, 1.0), progress: bool = False):
        """Generate images. ``latents``: (B, 16, h, w) initial noise in the unpacked layout.

        output: "pil" (list of PIL images), "np" ((B, H, W, 3) floats in [0, 1]) or "latent".
        """
        defaults = self.defaults
        height, width = height or defaults["size"], width or defaults["size"]
        steps = steps or defaults["steps"]
        cfg = defaults["cfg"] if cfg is None else cfg
        dg = defaults.get("dg", 0.0) if dg is None else dg
        max_sequence_length = max_sequence_length or defaults["max_sequence_length"]
        if output not in ("pil", "np", "latent"):
            raise ValueError(f"output must be 'pil', 'np' or 'latent', got {output!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        C, h, w = self.latent_shape(height, width)
        device, dtype = _where(self.transformer)
        if latents is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            latents = torch.randn(len(prompts), C, h, w, generator=generator)
        elif tuple(latents.shape) != (len(prompts), C, h, w):
            raise ValueError(f"latents must be ({len(prompts)}, {C}, {h}, {w}) "
                             f"for {len(prompts)} prompt(s) at {height}x{width}, got {tuple(latents.shape)}")
        cond = self.encode(prompts, max_sequence_length)
        uncond = self.encode(negatives, max_sequence_length) if cfg != 1.0 else None
        if self.family == "flux" and getattr(self.transformer.config, "guidance_embed", False):
            guidance = defaults["guidance"] if guidance is None else guidance
        else:
            guidance = None
        x = sample(self.denoiser, latents.to(device=device, dtype=dtype), self.sigmas(steps, h, w),
                   cond, uncond, cfg=cfg, dg=dg, cfg_interval=cfg_interval, dg_interval=dg_interval,
                   guidance=guidance, progress=progress)
        if output == "latent":
            return x
        images = self.decode(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return images if output == "np" else to_pil(images)


def to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def _where(module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype (fp8-stored weights compute in the dtype of the others)."""
    p = next(p for p in module.parameters() if p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2))
    return p.device, p.dtype


def _pipeline_folder(source, revision, token) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                  "pass the folder that holds model_index.json, transformer/, vae/, ...")
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file, not a pipeline folder; "
                              "use mmdit.load_transformer for single-file transformers")
    if not REPO_ID.match(str(source)):
        raise CheckpointError(f"{source} does not exist (and is not a hub repo id like 'org/name')")
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    from .weights.hub import cache_dir, offline

    try:
        folder = huggingface_hub.snapshot_download(str(source), revision=revision, token=token,
                                                   cache_dir=cache_dir(), allow_patterns=PIPELINE_FILES,
                                                   local_files_only=offline())
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError):
        raise CheckpointError(f"{source} is not in the local Hugging Face cache ({cache_dir()}) and "
                              f"{'HF_HUB_OFFLINE=1 forbids downloading it' if offline() else 'the hub is unreachable'}; "
                              "download it once with network access or pass a local folder") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{source} is neither a local folder nor a Hugging Face repo you can access") from None
    return _pipeline_folder(folder, revision, token)
