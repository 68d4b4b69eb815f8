"""A procedural captioned dataset: one textured shape of a named colour on a plain background.

Every image is 64x64 RGB in [-1, 1] (``size=`` for others): a circle, square or triangle of
one of 8 palette colours, at a random position and size, filled with one of five textures
(plain, fine stripes at any angle, a checkerboard, a dot lattice, pixel noise: the "detail"
that Detail Guidance should sharpen), on a background of a different palette colour with
faint noise. Captions read "a {colour} {texture} {shape} on a {background} background" or a
close paraphrase; a fifth of them leave the texture word out (the older captions, which
the first shipped model knows). Everything is drawn from one seeded generator with batched
torch ops, so ``batch(n, seed)`` is the same on every machine and costs about a millisecond
per image.

``read_colours``, ``read_shapes`` and ``read_textures`` read the labels back off an image
(every render is read correctly: tests/test_shapes.py); the benchmarks use them to score
generated images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Saturated, well separated colours (min pairwise RGB distance ~ 0.39 in [0, 1] units, red vs
# orange) so that a nearest-palette classifier can name a pixel even with texture on it.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 190),
    "orange": (250, 140, 10),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy")  # caption words
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape} on a {background} background",  # the canonical form, twice as likely
    "a {colour} {shape} against a {background} background",
    "{colour} {shape} on {background} background",
    "a {colour} {shape} over a {background} background",
    "a {colour} {shape}, {background} background",
)
SIZE = 64
TEXTURE_AMPLITUDE = 0.22  # peak texture offset in [-1, 1] units; keeps pixels nearest their palette colour
BACKGROUND_NOISE = 0.03
TEXTURE_WORD_P = 0.8  # captions that name the texture


def palette_tensor() -> torch.Tensor:
    """(8, 3) float32 palette in [-1, 1], in ``COLOURS`` order."""
    return torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 127.5 - 1


@dataclass
class Batch:
    """images: (B, 3, 64, 64) float32 in [-1, 1]; captions: B strings; the labels as indices
    into COLOURS / SHAPES / TEXTURES (colour, shape, background, texture: (B,) long) and the
    shape masks (B, 64, 64)."""

    images: torch.Tensor
    captions: list[str]
    colour: torch.Tensor
    shape: torch.Tensor
    background: torch.Tensor
    mask: torch.Tensor
    texture: torch.Tensor


def caption(colour: str, shape: str, background: str, template: int = 0, texture: str | None = None) -> str:
    """The caption of template ``template`` (0 = canonical) for these names; ``texture`` (a
    word of TEXTURES) goes between the colour and the shape: "a red striped circle on ..."."""
    thing = shape if texture is None else f"{texture} {shape}"
    text = TEMPLATES[template].format(colour=colour, shape=thing, background=background)
    return text.replace("a orange", "an orange")


def all_words() -> list[str]:
    """Every word any caption can contain, sorted (the word-level tokenizer's vocabulary)."""
    from .wordtok import split_words

    words = set(COLOURS) | set(SHAPES) | set(TEXTURES)
    for t in TEMPLATES:
        words |= set(split_words(t.format(colour="orange", shape="circle", background="orange")))
    words.add("an")
    return sorted(words)


def _coverage(sdf: torch.Tensor) -> torch.Tensor:
    """Anti-aliased inside-ness from a signed distance in pixels (negative inside)."""
    return (0.5 - sdf).clamp(0, 1)


def render(colour: torch.Tensor, shape: torch.Tensor, background: torch.Tensor, cx: torch.Tensor,
           cy: torch.Tensor, radius: torch.Tensor, texture: torch.Tensor, period: torch.Tensor,
           angle: torch.Tensor, generator: torch.Generator, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch from explicit parameters, each (B,): -> images (B, 3, S, S), masks (B, S, S).

    cx, cy, radius in pixels; texture indexes TEXTURES; period (pixels) and angle (radians)
    set the stripes; the noise textures draw from ``generator``.
    """
    B = colour.shape[0]
    ax = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = ax.view(1, size, 1), ax.view(1, 1, size)  # pixel centres
    dx, dy = torch.broadcast_tensors(xx - cx.view(B, 1, 1), yy - cy.view(B, 1, 1))  # (B, S, S)
    r = radius.view(B, 1, 1)
    circle = dx.hypot(dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r  # same area scale as the circle
    # Upward equilateral triangle (circumradius 1.2 r, a little larger to match the others' area):
    # three half-planes, apex at -r, base at +r/2.
    s3 = math.sqrt(3) / 2
    r = 1.2 * r
    triangle = torch.stack([dy - r / 2, -s3 * dx - dy / 2 - r / 2, s3 * dx - dy / 2 - r / 2]).amax(0)
    r = radius.view(B, 1, 1)
    sdf = torch.stack([circle, square, triangle], 1)[torch.arange(B), shape]  # (B, S, S)
    mask = _coverage(sdf)

    # Texture in [-1, 1] per pixel (TEXTURES order): none, stripes along ``angle``, a
    # checkerboard of period/2 cells, a lattice of dots (diameter 0.6 period; dark dots on
    # light colours, light dots on dark ones), or pixel noise.
    a, per = angle.view(B, 1, 1), period.view(B, 1, 1)
    u = (xx * torch.cos(a) + yy * torch.sin(a)) / per
    stripes = torch.sign(torch.sin(2 * math.pi * u))
    cell = per / 2
    checker = 1 - 2 * ((torch.floor(xx / cell) + torch.floor(yy / cell)) % 2)
    fx, fy = (xx / per) % 1 - 0.5, (yy / per) % 1 - 0.5  # offset from the nearest lattice point, in periods
    light = (palette_tensor()[colour].mean(1) > 0).float().view(B, 1, 1)
    dots = _coverage((fx.hypot(fy) - 0.3) * per) * (1 - 2 * light)
    noise = (torch.rand(B, size, size, generator=generator) * 2 - 1)
    plain = torch.zeros_like(noise)
    pattern = torch.stack([plain, stripes, checker, dots, noise], 1)[torch.arange(B), texture]  # (B, S, S)

    pal = palette_tensor()
    fg = pal[colour].view(B, 3, 1, 1) + TEXTURE_AMPLITUDE * pattern.unsqueeze(1)  # lighter / darker, grey axis
    bg = pal[background].view(B, 3, 1, 1) + BACKGROUND_NOISE * torch.randn(B, 3, size, size, generator=generator)
    m = mask.unsqueeze(1)
    return (m * fg + (1 - m) * bg).clamp(-1, 1), mask


def batch(n: int, seed: int, size: int = SIZE) -> Batch:
    """``n`` random captioned images; the same (n, seed) gives the same batch everywhere."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    # A background of a different colour: add 1..7 modulo 8.
    background = (colour + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    radius = torch.empty(n).uniform_(0.2 * size, 0.34 * size, generator=g)
    margin = radius * 1.2  # the triangle's apex is 1.2 radius above its centre: keep every shape inside
    cx = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    cy = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    texture = torch.randint(len(TEXTURES), (n,), generator=g)
    period = torch.empty(n).uniform_(6.0, 10.0, generator=g) * size / SIZE
    angle = torch.rand(n, generator=g) * math.pi
    template = torch.randint(len(TEMPLATES), (n,), generator=g)
    named = torch.rand(n, generator=g) < TEXTURE_WORD_P
    images, mask = render(colour, shape, background, cx, cy, radius, texture, period, angle, g, size)
    captions = [caption(COLOURS[c], SHAPES[s], COLOURS[b], t, TEXTURES[x] if w else None)
                for c, s, b, t, x, w in zip(colour.tolist(), shape.tolist(), background.tolist(), template.tolist(),
                                            texture.tolist(), named.tolist())]
    return Batch(images, captions, colour, shape, background, mask, texture)


def stream(batch_size: int, seed: int = 0, size: int = SIZE, start: int = 0):
    """An endless iterator of batches: batch i is ``batch(batch_size, seed * 1_000_003 + i)``,
    from i = ``start`` (a resumed run picks up where it stopped)."""
    i = start
    while True:
        yield batch(batch_size, seed * 1_000_003 + i, size)
        i += 1


def classify(images: torch.Tensor) -> torch.Tensor:
    """Nearest palette colour of every pixel: (B, 3, H, W) in [-1, 1] -> (B, H, W) long."""
    pal = palette_tensor().to(images.device)
    d = (images.float().unsqueeze(1) - pal.view(1, -1, 3, 1, 1)).square().sum(2)  # (B, 8, H, W)
    return d.argmin(1)


def read_colours(images: torch.Tensor, border: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(background, shape) colour indices (B,) read off images (B, 3, H, W) in [-1, 1].

    background = the most frequent palette class on a ``border``-pixel frame;
    shape = the most frequent other class over the whole image (-1 if there is none).
    """
    cls = classify(images)  # (B, H, W)
    B, H, W = cls.shape
    frame = torch.ones(H, W, dtype=torch.bool)
    frame[border:H - border, border:W - border] = False
    k = len(COLOURS)
    counts_border = torch.nn.functional.one_hot(cls[:, frame], k).sum(1)  # (B, 8)
    background = counts_border.argmax(1)
    counts = torch.nn.functional.one_hot(cls.flatten(1), k).sum(1)  # (B, 8)
    counts[torch.arange(B), background] = -1
    shape = torch.where(counts.amax(1) > 0, counts.argmax(1), -1)
    return background, shape


def _colour_masks(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels whose nearest palette colour is ``colour`` (B,)."""
    return classify(images) == colour.to(images.device).view(-1, 1, 1)


def read_shapes(images: torch.Tensor, colour: torch.Tensor, min_pixels: int = 30) -> torch.Tensor:
    """The shape drawn in ``colour`` (B,) on images (B, 3, H, W): indices into SHAPES, -1 when
    fewer than ``min_pixels`` pixels have that colour.

    The rule is how much of its bounding box the shape fills (box from the 1% / 99% quantiles
    of the pixel coordinates, so stray pixels do not stretch it): a square fills all of it, a
    circle pi/4 = 0.79, the upright triangle 0.5.
    """
    mask = _colour_masks(images, colour)
    out = torch.full((mask.shape[0],), -1, dtype=torch.long)
    for i, m in enumerate(mask):
        ys, xs = m.nonzero(as_tuple=True)
        if ys.numel() < min_pixels:
            continue
        q = torch.tensor([0.01, 0.99])
        (y0, y1), (x0, x1) = ys.float().quantile(q), xs.float().quantile(q)
        fill = ys.numel() / ((y1 - y0 + 1) * (x1 - x0 + 1)).item()
        out[i] = 2 if fill < 0.64 else 0 if fill < 0.9 else 1
    return out


def texture_features(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """(B, 5) features of the texture inside the shape of ``colour`` (B,): contrast, lag-1
    autocorrelation, gradient coherence, |skewness|, and the number of interior pixels.

    The interior is the colour's pixels whose 4 neighbours (2 pixels out) have it too, so the
    outline does not count; the signal is the pixels' mean over RGB, centred on its mean.
    """
    mask = _colour_masks(images, colour)
    inner = mask.clone()
    for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
        inner &= torch.roll(mask, (dy, dx), (1, 2))
    inner[:, :2], inner[:, -2:], inner[:, :, :2], inner[:, :, -2:] = False, False, False, False
    grey = images.float().mean(1)  # (B, H, W)
    feats = torch.zeros(images.shape[0], 5)
    for i in range(images.shape[0]):
        m = inner[i]
        n = int(m.sum())
        feats[i, 4] = n
        if n < 20:
            continue
        r = grey[i] - grey[i][m].mean()
        std = r[m].std().clamp_min(1e-6)
        smooth = F.avg_pool2d(r[None, None], 3, 1, 1, count_include_pad=False)[0, 0]  # steadier gradients
        gy, gx = smooth[1:, :-1] - smooth[:-1, :-1], smooth[:-1, 1:] - smooth[:-1, :-1]
        both_x, both_y = m[:, 1:] & m[:, :-1], m[1:] & m[:-1]
        lag1 = torch.cat([(r[:, 1:] * r[:, :-1])[both_x], (r[1:] * r[:-1])[both_y]]).mean() / std ** 2
        g = m[1:, :-1] & m[:-1, 1:] & m[:-1, :-1]
        jxx, jyy, jxy = (gx[g] ** 2).sum(), (gy[g] ** 2).sum(), (gx[g] * gy[g]).sum()
        coherence = ((jxx - jyy) ** 2 + 4 * jxy ** 2).sqrt() / (jxx + jyy).clamp_min(1e-12)
        skew = ((r[m] / std) ** 3).mean().abs()
        feats[i, :4] = torch.stack([std, lag1, coherence, skew])
    return feats


def read_textures(images: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """The texture inside the shape of ``colour`` (B,): indices into TEXTURES, -1 when the shape
    has too few interior pixels. Rules on ``texture_features``: contrast below a fifth of the
    rendered amplitude is plain; then no correlation between neighbours is noisy; gradients
    all along one direction is striped; a lopsided histogram (dots cover ~28%) is dotted; the
    rest is checkered."""
    f = texture_features(images, colour)
    std, lag1, coherence, skew, n = f.unbind(1)
    out = torch.where(std < 0.2 * TEXTURE_AMPLITUDE, 0,
                      torch.where(lag1 < 0.25, 4, torch.where(coherence > 0.5, 1, torch.where(skew > 0.5, 3, 2))))
    return torch.where(n < 20, -1, out)
