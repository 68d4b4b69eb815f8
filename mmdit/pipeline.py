"""Text to image: text encoders -> transformer sampled with CFG / DG -> VAE decoder."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import checks, image_modes, ma
from .compiled import CompiledTransformer, compile_mode, compile_regional
from .encoders.clip_t5_text import ChromaText, FluxText, SD3Text
from .lora import apply_lora
from .ma import MASpec
from .models.attention import sdpa_backends
from .models.cache import parse as parse_cache
from .samplers import Guidance, default_layers, flux2_sigmas, flux_sigmas, qwen_image_sigmas, sd3_sigmas
from .weights.checkpoint import CheckpointError, read_json
from .weights.encoders import load_text_encoder, load_vae
from .weights.hub import REPO_ID
from .weights.transformer import load_transformer

# The diffusers pipelines' defaults (docs/architecture.md, "Text conditioning").
# Chroma: ChromaPipeline's (35 steps, real CFG 5.0 with a negative prompt; diffusers' docs run Chroma1-HD
# at 40 / 3.0). Its schedule is always the official sampler's (lodestone-rock/flow, ``get_schedule``):
# FLUX.1's resolution-dependent shift, whatever the folder's scheduler config says ("dynamic_shift").
# FLUX.2: [dev]'s (guidance-distilled: 50 steps, embedded guidance 4.0, no CFG); [klein]'s differ per
# checkpoint (``VARIANT_DEFAULTS``).
# Qwen-Image: QwenImagePipeline's (50 steps, true CFG 4.0 with its norm rescale, 1024^2); 2.1:
# QwenImage21Pipeline's (40 steps, no CFG, the whole prompt).
DEFAULTS = {"sd3": dict(steps=28, cfg=7.0, max_sequence_length=256, size=1024),
            "flux": dict(steps=28, cfg=1.0, guidance=3.5, max_sequence_length=512, size=1024),
            "chroma": dict(steps=35, cfg=5.0, max_sequence_length=512, size=1024, dynamic_shift=True),
            "flux2": dict(steps=50, cfg=1.0, guidance=4.0, max_sequence_length=512, size=1024),
            "qwen-image": dict(steps=50, cfg=4.0, cfg_norm=True, max_sequence_length=512, size=1024),
            "qwen-image-2.1": dict(steps=40, cfg=1.0, max_sequence_length=None, size=1024)}
# The diffusers repos whose text encoders, tokenizers, VAE and scheduler go with a single transformer file.
OFFICIAL_REPOS = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
                  "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
                  "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
                  "flux.1-dev": "black-forest-labs/FLUX.1-dev", "flux.1-schnell": "black-forest-labs/FLUX.1-schnell",
                  "chroma": "lodestones/Chroma1-HD", "flux.2-dev": "black-forest-labs/FLUX.2-dev",
                  # klein base files too: same text encoder, VAE and scheduler as the distilled repos
                  "flux.2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",
                  "flux.2-klein-9b": "black-forest-labs/FLUX.2-klein-9B",
                  "qwen-image": "Qwen/Qwen-Image", "qwen-image-2.1": "Qwen/Qwen-Image-2.1"}
PIPELINE_FILES = ["model_index.json", "scheduler/*", "transformer/*", "vae/*", "text_encoder*/*", "tokenizer*/*",
                  "processor/*"]


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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Pipeline:
    """``images = pipe(prompt, negative_prompt="", steps=28, cfg=..., dg=..., seed=0)``."""

    def __init__(self, transformer, text, vae, family: str, scheduler: dict | None = None,
                 defaults: dict | None = None, compile: bool | str = False, parallel: str | None = None):
        """``compile=True``: sample with the transformer compiled as one graph per shape
        (``torch.compile(fullgraph=True)``; CUDA graphs on CUDA): the first call at a new size
        compiles (seconds to minutes), later ones are faster. ``compile="regional"``: each block
        compiled in place, one per kind of block (``compiled.compile_regional``): far less compile
        time, a little less speed. ``parallel``: "branch", "sequence"
        or "branch+sequence" splits each image's steps over the ranks of the default process group
        (``mmdit.distributed``; joined from torchrun's environment); one process: no change."""
        from . import distributed as ranks

        if parallel is not None and parallel not in ranks.MODES:
            raise ValueError(f"parallel={parallel!r}: use one of {ranks.MODES} (or None)")
        compile = compile_mode(compile)
        if compile is True and parallel is not None and "sequence" in parallel:
            raise ValueError(f"compile=True with parallel={parallel!r} is not supported (its all-to-alls are outside "
                             "the compiled graph); use parallel='branch', whose gather is outside the model")
        self.transformer, self.text, self.vae = transformer, text, vae
        if compile == "regional":
            compile_regional(transformer)
        self.denoiser = CompiledTransformer(transformer) if compile is True else transformer
        if parallel is not None:
            ranks.init(str(next(transformer.parameters()).device))
            self.denoiser = ranks.wrap(self.denoiser, parallel, transformer)
        self.parallel = parallel
        self.family = family
        self.scheduler = scheduler or {}
        self.defaults = {**DEFAULTS[family], **(defaults or {})}
        self.kontext = False  # a FLUX.1 Kontext model: image= is the reference to edit (same shapes as dev)

    @classmethod
    def tiny(cls, folder: str | os.PathLike | None = None, device="cpu", compile: bool | str = False, *,
             lora: list[tuple] | None = None, weight_dtype: torch.dtype | None = None,
             parallel: str | None = None) -> Pipeline:
        """The project's own small pixel-space model (default: the one shipped in the package).
        ``lora``, ``weight_dtype``, ``parallel``: as in ``from_pretrained``."""
        from .distributed import local_device
        from .tiny import load_tiny

        tiny = load_tiny(folder, device=local_device(device))
        _adapt(tiny.transformer, lora, weight_dtype)
        s = tiny.settings
        return cls(tiny.transformer, lambda prompts, _: tiny.conditioner.encode(prompts), PixelSpace(s.channels),
                   "sd3", {"shift": s.shift}, dict(steps=s.steps, cfg=s.cfg, dg=s.dg, size=s.size), compile,
                   parallel)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", *,
                        text_device=None, revision: str | None = None, token=None,
                        compile: bool | str = False, lora: list[tuple] | None = None,
                        weight_dtype: torch.dtype | None = None, parallel: str | None = None,
                        text_from: str | os.PathLike | None = None) -> Pipeline:
        """A diffusers repo id or pipeline folder (model_index.json + components; e.g.
        ``lodestones/Chroma1-HD``), a folder written
        by ``mmdit train`` (a tiny model), or one transformer file (any layout ``load_transformer``
        reads, as ComfyUI users hold them) whose text encoders, tokenizers, VAE and scheduler come
        from ``text_from`` (a repo id or pipeline folder; default: the official repo of the file's
        preset, ``OFFICIAL_REPOS``), said on stderr.

        ``text_device``: where the text encoders run (default: ``device``); "cpu" keeps
        them off the GPU. ``lora``: ``[(path or state dict, scale), ...]`` applied to the
        transformer (``mmdit.apply_lora``, unfused). ``weight_dtype=torch.float8_e4m3fn``:
        the transformer's Linear weights stay fp8 (see ``load_transformer``). ``parallel``: "branch"
        (a step's uncond / cond / DG rows on different ranks) or "sequence" (the tokens split over
        ranks, Ulysses attention) over the processes ``torchrun`` started, one per GPU; under
        torchrun ``device="cuda"`` is each rank's own GPU; "branch+sequence": both, on 2 halves of
        the ranks (4 or more). One process: as without it.
        """
        from .distributed import local_device

        device = local_device(device)
        text_device = None if text_device is None else local_device(text_device)
        if is_tiny_folder(source):  # written by `mmdit train`
            return cls.tiny(source, device=device, compile=compile, lora=lora, weight_dtype=weight_dtype,
                            parallel=parallel)
        single = Path(source).expanduser().is_file() or text_from is not None
        if single:  # one transformer file + the rest
            transformer = load_transformer(source, dtype=dtype, device=device, weight_dtype=weight_dtype,
                                           revision=revision, token=token)
            text_from = text_from if text_from is not None else _official_repo(transformer, source)
            root = _pipeline_folder(text_from, revision, token, transformer=False)
            print(f"text encoders, VAE and scheduler from {text_from}", file=sys.stderr, flush=True)
        else:
            root = _pipeline_folder(source, revision, token)
            transformer = load_transformer(root / "transformer", dtype=dtype, device=device,
                                           weight_dtype=weight_dtype)
        index = read_json(root / "model_index.json")
        _adapt(transformer, lora, None)
        family = transformer.config.family
        text_device = text_device or device
        text = TEXT[family](root, index, transformer, dtype, text_device)
        vae = load_vae(root / "vae", dtype=dtype, device=device, family=VAE_FAMILY.get(family, family))
        scheduler = read_json(root / "scheduler" / "scheduler_config.json") or {}
        sample_size = (read_json(root / "transformer" / "config.json") or {}).get("sample_size")
        size = {"size": sample_size * vae.config.downsample} if isinstance(sample_size, int) else {}  # as diffusers
        variant = VARIANT_DEFAULTS.get(family, lambda *_: {})(index, transformer, Path(source).name if single else None)
        pipe = cls(transformer, text, vae, family, scheduler, {**size, **variant}, compile=compile, parallel=parallel)
        pipe.kontext = "Kontext" in str(index.get("_class_name", ""))
        return pipe

    # --- pieces, usable on their own --------------------------------------------------------

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int | None = None) -> dict:
        cond = self.text(prompts, max_sequence_length or self.defaults["max_sequence_length"])
        device, dtype = _where(self.transformer)
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in cond.items()}

    def sigmas(self, steps: int, latent_h: int, latent_w: int, schedule: str = "default") -> torch.Tensor:
        """The schedule the diffusers pipeline would use with this scheduler config; ``schedule`` as
        its ``use_beta_sigmas`` / ``use_karras_sigmas`` / ``use_exponential_sigmas`` would re-space it."""
        return SIGMAS.get(self.family, shifted_sigmas)(self.family, self.scheduler, self.defaults, steps, latent_h,
                                                       latent_w, schedule)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for a height x width image; a clear error for bad sizes."""
        down = self.vae.config.downsample
        multiple = down * getattr(self.transformer.config, "patch_size", 2)  # FLUX packs 2x2
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}; "
                             f"try {max(multiple, height - height % multiple)}x{max(multiple, width - width % multiple)}")
        table = getattr(self.transformer.config, "pos_embed_max_size", None)  # SD3: a learned table; FLUX: RoPE
        if table is not None and max(height, width) > table * multiple:
            space = "pixel space, no VAE" if down == 1 else f"latents at 1/{down} of the image size"
            raise ValueError(f"height and width can be at most {table * multiple} pixels for this model ({space}; "
                             f"its position table covers {table}x{table} patches of {multiple} pixels), "
                             f"got {height}x{width}")
        return self.vae.config.latent_channels, height // down, width // down

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1] (Qwen-Image 2.1: (B, 4, H, W), RGBA as its VAE and pipeline)."""
        return (self.vae.decode(self.vae.denormalize(latents)).float() / 2 + 0.5).clamp(0, 1)

    # --- the whole thing --------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int | None = None,
                 cfg: float | None = None, dg: float | None = None, guidance: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int | list[int] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 max_sequence_length: int | None = None, output: str = "pil", callback=None, progress: bool = False,
                 sampler: str = "euler", schedule: str = "default", slg_start: float | None = None,
                 slg_stop: float | None = None, image=None, strength: float = 1.0, mask=None, control_image=None,
                 guide: Guidance | None = None, cache=None, **terms):
        """Generate ``len(prompts) * num_images_per_prompt`` images, prompt by prompt (the images of
        prompt 0 first).

        Noise: ``seed=s`` gives image i (in that order) its own generator seeded ``s + i``, so any
        image can be made again alone (``num_images_per_prompt=1, seed=s + i``); a list gives one
        seed per image. ``generator``: one torch.Generator drawing the whole batch in one call, or
        one per image (as in diffusers). Neither: torch's global RNG. ``latents``: the initial
        noise itself, (B, C, h, w) in the unpacked layout.
        callback: called after every step as ``callback(step, sigma_next, latents)``.
        sampler: "euler", "dpmpp_2m" or "heun" (``samplers.sample``); schedule: the spacing of the
        steps, "default" (the model's scheduler config), "beta", "karras" or "exponential".
        output: "pil" (list of PIL images), "np" ((B, H, W, 3) floats in [0, 1]) or "latent".
        cache: step caching, e.g. ``"fbcache:0.08"`` or ``"teacache:0.4"`` (``mmdit.models.cache``):
        fewer steps compute the middle blocks; its state lives for this call only.
        negative_prompt=None: no CFG (unless cfg= is given), as diffusers' Qwen-Image pipelines
        without a negative prompt; "" is the empty prompt's CFG (the default).

        Guidance: ``cfg`` and ``dg`` (default: the model's), and every other field of
        ``mmdit.samplers.Guidance`` as a keyword (diffusers-style): ``slg`` / ``slg_layers``,
        ``pag`` / ``pag_layers``, ``*_interval``, ``cfg_zero_star``, ``apg``; or a whole ``guide=``.
        DG on a model without an MA spec finds one first (``ensure_ma``). A perturbation given
        without its layers uses ``samplers.default_layers`` for this model and says so. SLG without
        ``slg_interval`` acts, as in diffusers' StableDiffusion3Pipeline, between the step fractions
        ``slg_start`` / ``slg_stop`` (steps i with start * steps < i < stop * steps; default 0.01
        and 0.2). Each perturbation is a copy of the cond rows inside the step's one model call.

        Images (PIL, numpy (H, W, 3) uint8 or float in [0, 1], tensors (3, H, W) in [0, 1]; one,
        or one per prompt) pick the mode with the checkpoint (``image_modes``): ``image`` alone is
        img2img (Kontext models: the reference to edit), with ``mask`` (white = repaint)
        inpainting (FLUX.1 Fill models: Fill); ``control_image`` is a Depth / Canny model's depth
        map or edge image. ``strength`` in (0, 1]: how much of the schedule runs from the image
        (1: from pure noise). height / width default to the image's size. FLUX.2: ``image`` (one,
        or a list) at strength 1 are reference images for every output, each at its own size (the
        output's defaults to the first's); strength < 1 is img2img from it.
        """
        defaults = self.defaults
        strength = checks.strength(strength)
        mode = image_modes.pick_mode(self, image, mask, control_image, strength)
        if strength < 1 and image is None or strength < 1 and mode == "kontext":
            raise ValueError(f"strength={strength:g} needs image= to start from (Kontext: the image is a reference, "
                             "not a start; leave strength at 1)")
        multiple = self.vae.config.downsample * getattr(self.transformer.config, "patch_size", 2)
        if mode == "refs":  # FLUX.2's references, each at its own size; the output's defaults to the first's
            image = image_modes.reference_pixels(image, multiple)
            size = tuple(image[0].shape[-2:])
        else:
            size = image_modes.image_size(image if image is not None else control_image, defaults["size"], multiple)
        height, width = height or size[0], width or size[1]
        steps = checks.steps(defaults["steps"] if steps is None else steps)
        if parse_cache(cache) is not None and self.parallel is not None:
            raise ValueError(f"cache= with parallel={self.parallel!r} is not supported: each rank would decide for "
                             "its own rows; use one of them")
        sampler = checks.choice("sampler", sampler, checks.SAMPLERS)
        schedule = checks.choice("schedule", schedule, checks.SCHEDULES)
        per_prompt = checks.count("num_images_per_prompt", num_images_per_prompt, 1, 256)
        max_sequence_length = max_sequence_length or defaults["max_sequence_length"]
        if output not in ("pil", "np", "latent"):
            raise ValueError(f"output must be 'pil', 'np' or 'latent', got {output!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str | None) else \
            list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if negative_prompt is None and cfg is None and guide is None:
            cfg = 1.0  # no negative prompt: no CFG
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        C, h, w = self.latent_shape(height, width)
        sigmas = self.sigmas(steps, h, w, schedule)
        guide = self.guide(guide, sigmas, cfg=cfg, dg=dg, slg_start=slg_start, slg_stop=slg_stop, **terms)
        device, dtype = _where(self.transformer)
        if latents is None:
            latents = initial_noise(len(prompts), (C, h, w), seed, generator)
        elif tuple(latents.shape) != (len(prompts), C, h, w):
            raise ValueError(f"latents must be ({len(prompts)}, {C}, {h}, {w}) for {len(prompts)} image(s) "
                             f"at {height}x{width}, got {tuple(latents.shape)}")
        cond = self.encode(prompts, max_sequence_length)
        uncond = self.encode(negatives, max_sequence_length) if guide.cfg != 1.0 and negative_prompt is not None \
            else None
        if getattr(self.transformer.config, "guidance_embed", False):  # a guidance-distilled model
            guidance = image_modes.GUIDANCE.get(mode, defaults["guidance"]) if guidance is None else guidance
        elif guidance is not None:
            warnings.warn(f"guidance={guidance} is ignored: it is FLUX.1-dev's distilled guidance, and this model "
                          "has no guidance input (cfg= is the guidance scale here)", stacklevel=2)
            guidance = None
        plan = image_modes.prepare(self, mode, len(prompts), height, width, image, mask, control_image)
        if plan.start is not None:
            sigmas = image_modes.strength_sigmas(sigmas, strength, steps)
        latents = latents.to(device=device, dtype=dtype)
        if guide.dg != 0.0:
            image_modes.check_dg(self.transformer, plan)
            self.ensure_ma(cond, latents, sigmas, guidance)
        with sdpa_backends(device):
            x = image_modes.denoise(self.denoiser, plan, latents, sigmas, cond, uncond, guide=guide,
                                    guidance=guidance, progress=progress, callback=callback, sampler=sampler,
                                    cache=cache)
        if output == "latent":
            return x
        images = self.decode(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return images if output == "np" else to_pil(images)

    def guide(self, guide: Guidance | None, sigmas, *, cfg=None, dg=None, slg_start=None, slg_stop=None,
              **terms) -> Guidance:
        """The one ``Guidance`` of a call: ``guide`` or the keywords, the model's defaults for cfg and
        dg, default layers for a perturbation given without them (said on stderr), and SLG's step
        fractions turned into its sigma interval."""
        unknown = sorted(set(terms) - {f.name for f in fields(Guidance)})
        if unknown:
            raise TypeError(f"unknown guidance keyword(s) {unknown}; Guidance has {[f.name for f in fields(Guidance)]}")
        if guide is not None:
            if terms or cfg is not None or dg is not None:
                raise ValueError("give guide= or guidance keywords (cfg=, dg=, slg=, ...), not both")
            return guide
        terms.update(cfg=self.defaults["cfg"] if cfg is None else cfg, dg=self.defaults.get("dg", 0.0) if dg is None
                     else dg)
        for f in fields(Guidance):  # the model's own default for the other such terms (Qwen-Image's cfg_norm)
            if f.metadata.get("model_default") and terms.get(f.name) is None:
                terms[f.name] = self.defaults.get(f.name, f.default)
        total = self.transformer.config.total_blocks
        for term in ("slg", "pag"):
            if checks.scale(term, terms.get(term, 0.0), off=0) and not terms.get(f"{term}_layers"):
                terms[f"{term}_layers"] = default_layers(term, total)
                print(f"{term}: no {term}_layers given; using blocks {list(terms[f'{term}_layers'])} "
                      f"(the default for a {total}-block model)", file=sys.stderr, flush=True)
        for name in ("slg_layers", "pag_layers"):
            if name in terms:
                terms[name] = checks.layers(name, terms[name], total)
        if terms.get("slg_interval") is None:
            interval = step_interval(sigmas, slg_start, slg_stop)
            if interval is None:  # no step between the fractions
                terms.update(slg=0.0, slg_interval=(0.0, 1.0))
            else:
                terms["slg_interval"] = interval
        return Guidance(**terms)

    def ensure_ma(self, cond: dict, latents: torch.Tensor, sigmas, guidance=None, *, ratio: float = 50.0) -> MASpec:
        """The transformer's MA spec, found now if it has none (DG out of the box): the MA policy
        (``ma.ensure_spec``) on this call's first prompt. For an official architecture, one forward
        checks whether the channels the paper reports are massive here; else the channels are
        calibrated on a short cond-only trajectory (8 steps, every 2nd probed). Either way the spec
        is cached under the checkpoint's content hash and one line on stderr says what was done.
        """
        model = self.transformer
        first = {k: v[:1] for k, v in cond.items()}
        named = {**first, **({} if guidance is None else {"guidance": guidance})}
        check = (latents[:1], float(sigmas[0]), named)

        def trajectory():
            from .ma.report import calibration_samples

            return calibration_samples(model, {"": first}, sigmas=self.sigmas(8, latents.shape[-2], latents.shape[-1]),
                                       latent_shape=tuple(latents.shape[1:]), guidance=guidance, every=2)

        return ma.ensure_spec(model, trajectory, check=check, ratio=ratio)


def initial_noise(n: int, shape: tuple, seed=None, generator=None) -> torch.Tensor:
    """(n, *shape) standard normal float32 noise; see ``Pipeline.__call__`` for how seeds map to images."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if isinstance(generator, torch.Generator):
            return torch.randn(n, *shape, generator=generator, device=generator.device).cpu()
        generators = list(generator)
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} images; give one, or one per image")
        return torch.stack([torch.randn(*shape, generator=g, device=g.device).cpu() for g in generators])
    if seed is None:
        return torch.randn(n, *shape)
    seeds = [checks.seed(seed) + i for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images; give one seed, or one per image")
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(checks.seed(s)))
                        for s in seeds])


def step_interval(sigmas, start: float | None, stop: float | None) -> tuple[float, float] | None:
    """The sigma interval holding the steps i with ``start * n < i < stop * n`` (n steps), the
    rule diffusers' StableDiffusion3Pipeline applies to skip-layer guidance; None if no step is."""
    start = checks.fraction("slg_start", 0.01 if start is None else start)
    stop = checks.fraction("slg_stop", 0.2 if stop is None else stop)
    n = len(sigmas) - 1
    steps = [i for i in range(n) if start * n < i < stop * n]
    if not steps:
        return None
    return float(sigmas[steps[-1]]), float(sigmas[steps[0]])


def to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def _adapt(transformer, lora: list[tuple] | None, weight_dtype: torch.dtype | None) -> None:
    """fp8 weights (for a model loaded in full precision) and LoRAs ``[(path, scale), ...]``."""
    if weight_dtype is not None:
        from .fp8 import quantize_linears

        quantize_linears(transformer, weight_dtype)
    for path, scale in lora or ():
        apply_lora(transformer, path, scale)


def _where(module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype (fp8-stored weights compute in the dtype of the others)."""
    p = next(p for p in module.parameters() if p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2))
    return p.device, p.dtype


def is_tiny_folder(source) -> bool:
    """A folder in the tiny model's format (``mmdit.tiny.save_tiny``): a config.json without a
    model_index.json beside it. Its config.json that is not JSON is one clear error."""
    folder = Path(source).expanduser()
    path = folder / "config.json"
    if not path.is_file() or (folder / "model_index.json").is_file():
        return False
    from .tiny.model import FORMAT

    data = read_json(path)  # CheckpointError naming the file when it is not JSON
    return isinstance(data, dict) and data.get("format") == FORMAT


def _clip_t5(root: Path, index: dict, family: str, names: list[str], dtype, device) -> tuple[list, list]:
    """The tokenizers and text encoders ``names`` (``text_encoder``, ``text_encoder_2``, ...) of a pipeline
    folder; SD3's T5 (``text_encoder_3``) may be absent (None)."""
    from .encoders.tokenizers import load_tokenizer

    tokenizers, encoders = [], []
    for name in names:
        present = index.get(name, [None])[0] is not None and (root / name).is_dir()
        if not present and name == "text_encoder_3":  # SD3 without T5
            tokenizers.append(None), encoders.append(None)
            continue
        if not present:
            raise CheckpointError(f"{root} has no {name}/ (the {family} pipeline needs it)")
        tokenizers.append(load_tokenizer(root / name.replace("text_encoder", "tokenizer")))
        encoders.append(load_text_encoder(root / name, dtype=dtype, device=device))
    return tokenizers, encoders


def _sd3_text(root, index, transformer, dtype, device) -> SD3Text:
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    tokenizers, encoders = _clip_t5(root, index, "sd3", names, dtype, device)
    return SD3Text(tuple(tokenizers), tuple(encoders), transformer.config.context_dim)


def _flux_text(root, index, transformer, dtype, device) -> FluxText:
    tokenizers, encoders = _clip_t5(root, index, "flux", ["text_encoder", "text_encoder_2"], dtype, device)
    return FluxText(tuple(tokenizers), tuple(encoders))


def _chroma_text(root, index, transformer, dtype, device) -> ChromaText:
    (tokenizer,), (encoder,) = _clip_t5(root, index, "chroma", ["text_encoder"], dtype, device)
    return ChromaText(tokenizer, encoder)


def _flux2_text(root, index, transformer, dtype, device):
    """[dev]'s Mistral-Small or [klein]'s Qwen3 (``Flux2KleinPipeline`` folders; without a class name:
    no guidance input means [klein]), with the official prompt recipe (``encoders.prompts``)."""
    from .encoders.prompts import load_lm_text

    name = str(index.get("_class_name", ""))
    klein = "Klein" in name if name else not transformer.config.guidance_embed
    text = load_lm_text("flux.2-klein" if klein else "flux.2-dev", root, dtype=dtype, device=device)
    width = len(text.fmt.layers) * text.encoder.config.hidden_size
    if width != transformer.config.context_dim:
        raise CheckpointError(f"{root}'s text encoder gives {width}-wide prompt embeddings, but this FLUX.2 "
                              f"transformer takes {transformer.config.context_dim} (klein 4B: Qwen3-4B, 9B: Qwen3-8B, "
                              "dev: Mistral-Small): pass text_from= the pipeline of the transformer's own variant")
    return text


def flux2_defaults(index: dict, transformer, file: str | None) -> dict:
    """A FLUX.2 checkpoint's own defaults over ``DEFAULTS["flux2"]`` ([dev]'s). [klein] has no guidance
    input and comes in two kinds that its weights can't tell apart: step-distilled (klein-4B / 9B: 4
    steps, no CFG; BFL fixes both) and base (klein-base-4B / 9B: 50 steps, real CFG 4.0 against the
    empty prompt, through the same chat template). A folder says which in model_index.json's
    ``is_distilled`` (absent: base, as ``Flux2KleinPipeline`` assumes); a single ``file`` by its name
    (BFL's rule: "base" in it)."""
    if transformer.config.guidance_embed:
        return {}
    distilled = "base" not in file.lower() if file is not None else bool(index.get("is_distilled", False))
    return dict(steps=4, cfg=1.0, guidance=None) if distilled else dict(steps=50, cfg=4.0, guidance=None)


def _lm_text(root, index, transformer, dtype, device):
    """A decoder LM's prompts -> context and its mask (``encoders.prompts``: Qwen-Image's templates)."""
    from .encoders.prompts import load_lm_text

    return load_lm_text(transformer.config.family, root, dtype=dtype, device=device)


def shifted_sigmas(family: str, scheduler: dict, defaults: dict, steps: int, latent_h: int, latent_w: int,
                   schedule: str):
    """SD3's static shift, or FLUX.1's resolution-dependent one (FLUX.1, Chroma: always; others when
    their scheduler config says ``use_dynamic_shifting``), as ``FlowMatchEulerDiscreteScheduler`` does."""
    s = scheduler
    dynamic = defaults.get("dynamic_shift", False)  # Chroma: the official sampler's shift, always
    if family in ("flux", "chroma") or s.get("use_dynamic_shifting"):
        return flux_sigmas(steps, (latent_h // 2) * (latent_w // 2),
                           base_shift=s.get("base_shift", 0.5), max_shift=s.get("max_shift", 1.15),
                           base_seq_len=s.get("base_image_seq_len", 256), max_seq_len=s.get("max_image_seq_len", 4096),
                           shift=dynamic or s.get("use_dynamic_shifting", True), schedule=schedule)
    return sd3_sigmas(steps, shift=s.get("shift", 3.0), schedule=schedule)


def empirical_mu_sigmas(family: str, scheduler: dict, defaults: dict, steps: int, latent_h: int, latent_w: int,
                        schedule: str):
    """FLUX.2: the official sampler's empirical mu for the target's tokens (one per latent position) and
    the step count, whatever the folder's scheduler config says (the pipelines pass mu to the scheduler)."""
    return flux2_sigmas(steps, latent_h * latent_w, schedule)


def qwen_sigmas(family: str, scheduler: dict, defaults: dict, steps: int, latent_h: int, latent_w: int,
                schedule: str):
    """The Qwen-Image pipelines' schedule: mu from the image's tokens (1.0: 2x2 latents each; 2.1: one
    latent each), shift settings from the scheduler config (absent: the released ones)."""
    s = scheduler
    tokens = latent_h * latent_w if family == "qwen-image-2.1" else (latent_h // 2) * (latent_w // 2)
    return qwen_image_sigmas(steps, tokens, base_shift=s.get("base_shift", 0.5), max_shift=s.get("max_shift", 0.9),
                             base_seq_len=s.get("base_image_seq_len", 256),
                             max_seq_len=s.get("max_image_seq_len", 8192),
                             shift_terminal=s.get("shift_terminal", 0.02), schedule=schedule)


# family -> the sigmas function (shifted_sigmas' arguments), where not shifted_sigmas
SIGMAS = {"flux2": empirical_mu_sigmas, "qwen-image": qwen_sigmas, "qwen-image-2.1": qwen_sigmas}
# family -> (pipeline folder, model_index.json, transformer, dtype, device) -> the text conditioning callable
TEXT = {"sd3": _sd3_text, "flux": _flux_text, "chroma": _chroma_text, "flux2": _flux2_text, "qwen-image": _lm_text,
        "qwen-image-2.1": _lm_text}
VAE_FAMILY = {"chroma": "flux"}  # a family whose VAE is another family's
# family -> (model_index.json, transformer, file name or None) -> defaults that differ per checkpoint
VARIANT_DEFAULTS = {"flux2": flux2_defaults}


def _official_repo(transformer, source) -> str:
    """The hub repo whose text encoders and VAE go with a transformer file of an official preset."""
    preset = getattr(getattr(transformer, "detected", None), "preset", None)
    if preset not in OFFICIAL_REPOS:
        raise CheckpointError(f"{source} is a transformer of no official preset ({preset or 'a custom config'}), so "
                              "the text encoders and VAE it needs are not known: pass text_from= (CLI: --text-from "
                              "REPO_OR_FOLDER), a diffusers pipeline folder or repo id of the same family")
    return OFFICIAL_REPOS[preset]


def _pipeline_folder(source, revision, token, transformer: bool = True) -> Path:
    """A local pipeline folder, or a hub repo's snapshot (without transformer/ when ``transformer`` is False)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                  "pass the folder that holds model_index.json, transformer/, vae/, ...")
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file, not a pipeline folder: give a diffusers pipeline folder or repo "
                              "id for the text encoders and VAE")
    if not REPO_ID.match(str(source)):
        raise CheckpointError(f"{source} does not exist (and is not a hub repo id like 'org/name')")
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    from .weights.hub import cache_dir, offline

    try:
        patterns = PIPELINE_FILES if transformer else [p for p in PIPELINE_FILES if not p.startswith("transformer")]
        folder = huggingface_hub.snapshot_download(str(source), revision=revision, token=token,
                                                   cache_dir=cache_dir(), allow_patterns=patterns,
                                                   local_files_only=offline())
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError):
        raise CheckpointError(f"{source} is not in the local Hugging Face cache ({cache_dir()}) and "
                              f"{'HF_HUB_OFFLINE=1 forbids downloading it' if offline() else 'the hub is unreachable'}; "
                              "download it once with network access or pass a local folder") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{source} is neither a local folder nor a Hugging Face repo you can access") from None
    return _pipeline_folder(folder, revision, token, transformer)
