"""Image-conditioned generation: img2img, inpainting, FLUX.1 Fill / Depth / Canny / Kontext, FLUX.2 references.

Every mode is the text-to-image sampler plus one or more of three things (``Plan``):

  start      the image's latents x0: sampling starts at sigma_0 of the schedule cut by
             ``strength`` (as diffusers: the last ``int(steps * strength)`` steps), from
             ``sigma_0 * noise + (1 - sigma_0) * x0``                    img2img, inpaint, Fill
  keep       a latent-size mask, 1 where the image is kept: after every step those latents are
             reset to the image noised to the new sigma (diffusers' inpaint blend)    inpaint
  condition  channels appended to every row's latents (``Conditioned``): Fill's masked-image
             latents and pixel mask (8x8 pixels per latent as 64 channels), Depth / Canny's
             control latents, or Kontext's reference latents (the model turns those into
             tokens of their own)                                   Fill, Depth / Canny, Kontext
  refs       reference latents given to every call as the model's ``refs`` (FLUX.2: tokens of
             their own, each image at its own size)              FLUX.2 references, inpaint

The conditioning is part of each row's input, so CFG's uncond rows and DG's forked rows carry
it: still one model call per step. The mode comes from the checkpoint (its extra input
channels; Kontext from the pipeline's ``kontext`` flag; FLUX.2 from its family) and from the
arguments. FLUX.2 tells references from img2img as Kontext does: ``image`` at strength 1 is
what to edit (here: a reference, one or several); strength < 1 starts from it (Kontext: an error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .samplers import sample

GUIDANCE = {"fill": 30.0}  # FLUX.1-Fill-dev's distilled guidance default (BFL, diffusers); the others keep 3.5
REFERENCE_FAMILIES = ("flux2",)  # models taking reference latents as tokens of their own (``refs=``)
REFERENCE_AREA = 1024 * 1024  # Flux2Pipeline's cap on a reference's pixels (BFL's: 2024^2 for a single one)


@dataclass
class Plan:
    """What a mode adds to text-to-image sampling; tensors are (B, C, h, w) latents or None."""

    mode: str  # "text" | "img2img" | "inpaint" | "fill" | "control" | "kontext" | "refs"
    start: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    refs: tuple[torch.Tensor, ...] | None = None  # (1 or B, C, h_i, w_i) each


def pick_mode(pipe, image, mask, control_image, strength: float = 1.0) -> str:
    """The mode for this checkpoint and these arguments; one clear error when they don't fit."""
    cfg = pipe.transformer.config
    extra = getattr(cfg, "condition_channels", 0)
    latent, down = pipe.vae.config.latent_channels, pipe.vae.config.downsample
    if mask is not None and image is None:
        raise ValueError("mask= needs image=: the mask says which part of that image to repaint")
    if extra == latent + down * down:  # FLUX.1 Fill
        if image is None or mask is None:
            raise ValueError("this is a FLUX.1 Fill model: give image= and mask= (white = fill in)")
        if control_image is not None:
            raise ValueError("a FLUX.1 Fill model takes no control_image (that is for Depth / Canny models)")
        return "fill"
    if extra == latent:  # FLUX.1 Depth / Canny
        if control_image is None:
            raise ValueError("this is a FLUX.1 Depth / Canny model: give control_image= (a depth map or an edge "
                             "image that you made; it is not computed here)")
        if mask is not None:
            raise ValueError("a FLUX.1 Depth / Canny model does not inpaint: drop mask=")
        return "control"
    if extra:
        raise ValueError(f"this model takes {extra} conditioning channels per latent, which is neither FLUX.1 Fill "
                         f"({latent + down * down}) nor Depth / Canny ({latent}) with this VAE")
    if control_image is not None:
        raise ValueError("control_image= needs a FLUX.1 Depth / Canny model; this one has no control input")
    if getattr(cfg, "family", None) == "qwen-image-2.1" and image is not None:
        raise ValueError("Qwen-Image 2.1's image= is a condition image its text encoder reads, which this pipeline "
                         "does not do yet: it draws from text only (drop image= / mask=)")
    if getattr(pipe, "kontext", False):
        if mask is not None:
            raise ValueError("a FLUX.1 Kontext model edits the whole image: drop mask= (or use a Fill model)")
        return "text" if image is None else "kontext"
    if cfg.family in REFERENCE_FAMILIES and image is not None and mask is None and strength == 1:
        return "refs"
    return "inpaint" if mask is not None else "img2img" if image is not None else "text"


def check_dg(model, plan: Plan) -> None:
    """DG with Fill / Depth / Canny needs an MA spec: finding one (``Pipeline.ensure_ma``) samples
    text to image, which a model with extra input channels cannot do. (Kontext can: it has
    FLUX.1-dev's shapes, and its channels are found without the reference.)"""
    if plan.mode in ("fill", "control") and model.ma is None:
        raise ValueError(f"dg in {plan.mode} mode needs this model's MA channels, and it has none: set "
                         "pipe.transformer.ma = mmdit.MASpec(channels=..., block=...) (e.g. the base model's, "
                         "from `mmdit calibrate-ma --model BASE`)")


def strength_sigmas(sigmas, strength: float, steps: int):
    """The tail of the schedule that ``strength`` keeps (diffusers' ``get_timesteps``)."""
    t_start = int(max(steps - min(steps * strength, steps), 0))  # < steps for any strength > 0
    return sigmas[t_start:]


def image_size(image, size: int, multiple: int) -> tuple[int, int]:
    """(height, width) of a given image (of the first, for a list), rounded down to ``multiple``."""
    if image is None:
        return size, size
    h, w = as_images(image, "image").shape[-2:]
    if h < multiple or w < multiple:
        raise ValueError(f"the image is {h}x{w} pixels; the model needs at least {multiple}x{multiple}")
    return h - h % multiple, w - w % multiple


def as_images(value, name: str, gray: bool = False) -> torch.Tensor:
    """PIL image(s), numpy (H, W, 3) / (N, H, W, 3) uint8 or float in [0, 1], or tensors
    (3, H, W) / (N, 3, H, W) in [0, 1] -> float32 (N, C, H, W) in [0, 1]; C = 1 if ``gray``."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL
            item = np.array(item.convert("L" if gray else "RGB"))
        if isinstance(item, np.ndarray):
            scale = 255.0 if item.dtype == np.uint8 else 1.0
            t = torch.from_numpy(np.ascontiguousarray(item)).float() / scale
            t = t[..., None] if t.ndim == 2 else t
            t = t.unsqueeze(0) if t.ndim == 3 else t
            if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
                raise ValueError(f"{name} as a numpy array must be (H, W, 3) or (N, H, W, 3), got {item.shape}")
            t = t[..., :3].permute(0, 3, 1, 2)
        elif torch.is_tensor(item):
            t = item.detach().float().cpu()
            t = t[None, None] if t.ndim == 2 else t.unsqueeze(0) if t.ndim == 3 else t
            if t.ndim != 4 or t.shape[1] not in (1, 3):
                raise ValueError(f"{name} as a tensor must be (3, H, W) or (N, 3, H, W), got {tuple(item.shape)}")
        else:
            raise ValueError(f"{name} must be a PIL image, a numpy array or a tensor, got {type(item).__name__}")
        if gray and t.shape[1] == 3:
            t = t.mean(dim=1, keepdim=True)
        elif not gray and t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        out.append(t)
    sizes = {tuple(t.shape[-2:]) for t in out}
    if len(sizes) > 1:
        raise ValueError(f"the {name} images have different sizes {sorted(sizes)}; give them one size")
    return torch.cat(out)


def reference_pixels(image, multiple: int) -> list[torch.Tensor]:
    """FLUX.2's reference images as ``Flux2Pipeline`` prepares them, each on its own (sizes may
    differ): shrunk to ``REFERENCE_AREA`` pixels when larger (PIL images with LANCZOS as diffusers,
    arrays and tensors antialiased bicubic), then center-cropped, not resized, to multiples of
    ``multiple`` -> a list of (1, 3, h_i, w_i) in [0, 1]."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    out = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size") and item.size[0] * item.size[1] > REFERENCE_AREA:
            from PIL import Image

            w, h = item.size
            scale = math.sqrt(REFERENCE_AREA / (w * h))
            item = item.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        for t in as_images(item, "image").split(1):
            H, W = t.shape[-2:]
            if H * W > REFERENCE_AREA:
                scale = math.sqrt(REFERENCE_AREA / (H * W))
                t = F.interpolate(t, size=(int(H * scale), int(W * scale)), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
                H, W = t.shape[-2:]
            h, w = H - H % multiple, W - W % multiple
            if not h or not w:
                raise ValueError(f"a reference image is {H}x{W} pixels; the model needs at least {multiple}x{multiple}")
            top, left = (H - h) // 2, (W - w) // 2
            out.append(t[..., top:top + h, left:left + w])
    return out


def _fit(t: torch.Tensor, n: int, height: int, width: int, name: str, nearest: bool = False) -> torch.Tensor:
    """Resize to height x width (when needed) and repeat to n rows (1 image, or one per prompt)."""
    if tuple(t.shape[-2:]) != (height, width):
        t = F.interpolate(t, size=(height, width), mode="nearest") if nearest else \
            F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if n % t.shape[0]:
        raise ValueError(f"{t.shape[0]} {name} images for {n} outputs; give one, or one per prompt or per output")
    return t.repeat_interleave(n // t.shape[0], dim=0)


@torch.no_grad()
def encode(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalised latents (``vae.normalize`` of the posterior mean:
    ``scaling * (mean - shift)`` for SD3 / FLUX.1), float32."""
    vae = pipe.vae
    p = next(vae.parameters(), None) if hasattr(vae, "parameters") else None
    x = images * 2 - 1
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return vae.normalize(vae.encode(x).float()).cpu()


def prepare(pipe, mode: str, n: int, height: int, width: int, image=None, mask=None, control_image=None) -> Plan:
    """The Plan for ``n`` outputs of height x width (images are resized to it when they differ)."""
    if mode == "text":
        return Plan(mode)
    if mode == "refs":  # ``image``: reference_pixels' list, one row each, shared by every output
        return Plan(mode, refs=tuple(encode(pipe, r) for r in image))
    down = pipe.vae.config.downsample
    pixels = None if image is None else _fit(as_images(image, "image"), n, height, width, "image")
    if mode == "kontext":  # the image is the reference, resized to the output's size
        return Plan(mode, condition=encode(pipe, pixels))
    plan = Plan(mode, start=None if pixels is None else encode(pipe, pixels))
    if mask is not None:
        m = _fit(as_images(mask, "mask", gray=True), n, height, width, "mask")
        m = (m >= 0.5).float()  # white = repaint, binarized as diffusers does
        if mode == "inpaint" and pipe.transformer.config.family in REFERENCE_FAMILIES:
            # Flux2KleinInpaintPipeline: the mask bilinear on the latent grid, the image also a reference
            plan.keep = 1 - F.interpolate(m, size=(height // down, width // down), mode="bilinear")
            plan.refs = (plan.start,)
        elif mode == "inpaint":
            plan.keep = 1 - F.interpolate(m, size=(height // down, width // down))
        else:  # Fill: the masked image's latents, then the mask, each pixel of a latent's 8x8 a channel
            masked = encode(pipe, pixels * (1 - m) + 0.5 * m)  # repainted pixels are 0 in [-1, 1]
            h, w = height // down, width // down
            mask_channels = m.view(n, h, down, w, down).permute(0, 2, 4, 1, 3).reshape(n, down * down, h, w)
            plan.condition = torch.cat([masked, mask_channels], dim=1)
    if control_image is not None:
        plan.condition = encode(pipe, _fit(as_images(control_image, "control_image"), n, height, width, "control"))
    return plan


class Conditioned(Denoiser):
    """The denoiser with a Plan's conditioning channels appended to every row's latents (the
    CFG / DG rows are copies of the image's rows, so each repeats the same conditioning)."""

    def __init__(self, model, condition: torch.Tensor):
        super().__init__(model)
        self.condition = condition

    def __call__(self, x, sigma, *inputs, **named):
        c = self.condition.to(device=x.device, dtype=x.dtype)
        c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return self.model(torch.cat([x, c], dim=1), sigma, *inputs, **named)


class Referenced(Denoiser):
    """The denoiser with reference latents as the model's ``refs`` in every call: a reference of
    one row serves every row (the model expands it), one of B rows is repeated like the latents
    for CFG's rows (DG's forked rows are copies the model makes, references included)."""

    def __init__(self, model, refs: tuple[torch.Tensor, ...]):
        super().__init__(model)
        self.refs = refs

    def __call__(self, x, sigma, *inputs, **named):
        refs = tuple(r if r.shape[0] == 1 else r.repeat(x.shape[0] // r.shape[0], 1, 1, 1) for r in self.refs)
        return self.model(x, sigma, *inputs, refs=refs, **named)


def denoise(model, plan: Plan, noise: torch.Tensor, sigmas, cond, uncond, *, callback=None, progress=False,
            **options) -> torch.Tensor:
    """Sample from ``noise`` over ``sigmas`` (already cut by strength) in the Plan's mode."""
    dtype = noise.dtype
    if plan.condition is not None:
        model = Conditioned(model, plan.condition.to(device=noise.device, dtype=dtype))
    if plan.refs is not None:
        model = Referenced(model, tuple(r.to(device=noise.device, dtype=dtype) for r in plan.refs))
    x = noise
    if plan.start is not None:
        start = plan.start.to(device=noise.device, dtype=torch.float32)
        s0 = float(sigmas[0])
        x = (s0 * noise.float() + (1 - s0) * start).to(dtype)
    if plan.keep is None:
        return sample(model, x, sigmas, cond, uncond, callback=callback, progress=progress, **options)
    keep = plan.keep.to(device=noise.device, dtype=dtype)

    def blend(i, s, x):  # after every step, the kept region back at that noise level (diffusers' inpaint)
        known = (s * noise.float() + (1 - s) * start).to(dtype)
        x = keep * known + (1 - keep) * x
        if callback is not None:
            replaced = callback(i, s, x)
            x = replaced if torch.is_tensor(replaced) else x
        return x

    return sample(model, x, sigmas, cond, uncond, callback=blend, progress=progress, **options)
