"""The shipped tiny model (mmdit/weights/tiny/) follows colour prompts.

32 prompts cover every palette colour 4 times as the shape's colour (each time on a different
background) and 4 times as the background, with the three shapes in turn; each image has its
own seed.
Pixels are classified to the nearest of the 8 palette colours: the background is the most
frequent class on a 3-pixel frame, the shape the most frequent other class (the same reader
gets 100% of the training images right, tests/test_shapes.py).

Chance is 1/8 for the background and 1/7 for the shape. The threshold, 75% (24 of 32) for
each, is far above chance (a chance-level model reaches it with probability ~1e-14) and well
below the measured rates (100% / 100% for the shipped model, printed with -s): even a model
whose true rate were only 90% would fall under it with probability 0.3%, so the test is not
flaky, yet it fails if prompt following breaks.
"""
import json

import pytest
import torch

from mmdit import tiny
from mmdit.tiny import shapes

N = 32
STEPS = 12
CFG = 4.0
THRESHOLD = 0.75


@pytest.fixture(scope="module")
def shipped():
    return tiny.load_tiny()


def prompt_set():
    K = len(shapes.COLOURS)
    combos = []
    for i in range(N):
        colour = i % K
        background = (colour + (1, 3, 4, 6)[i // K]) % K  # 4 different backgrounds per colour
        combos.append((colour, i % len(shapes.SHAPES), background))
    prompts = [shapes.caption(shapes.COLOURS[c], shapes.SHAPES[s], shapes.COLOURS[b]) for c, s, b in combos]
    colour = torch.tensor([c for c, _, _ in combos])
    background = torch.tensor([b for _, _, b in combos])
    return prompts, colour, background


def test_prompt_set_covers_the_palette():
    prompts, colour, background = prompt_set()
    assert (colour != background).all() and len(set(prompts)) == N
    assert torch.bincount(colour, minlength=8).tolist() == [4] * 8
    assert torch.bincount(background, minlength=8).tolist() == [4] * 8


def test_shipped_folder():
    folder = tiny.default_folder()
    for name in ("config.json", "vocab.json", "transformer.safetensors", "text_encoder.safetensors"):
        assert (folder / name).is_file(), f"{folder / name} is missing"
    size = sum((folder / n).stat().st_size for n in ("transformer.safetensors", "text_encoder.safetensors"))
    assert size < 8e6, f"the shipped weights are {size / 1e6:.1f} MB"
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["seed"] == 0 and config["training"]["steps"] > 0
    assert config["ma"] is not None and config["ma"]["block"] < config["transformer"]["num_layers"]


def test_shipped_model_follows_colours(shipped):
    prompts, colour, background = prompt_set()
    images = tiny.generate(shipped, prompts, seed=list(range(N)), steps=STEPS, cfg=CFG)
    got_background, got_shape = shapes.read_colours(images)
    bg_rate = (got_background == background).float().mean().item()
    shape_rate = (got_shape == colour).float().mean().item()
    both = ((got_background == background) & (got_shape == colour)).float().mean().item()
    print(f"\ntiny model, {N} prompts, {STEPS} steps, cfg {CFG}: background {bg_rate:.0%}, "
          f"shape {shape_rate:.0%}, both {both:.0%} (chance 12.5% / 14.3%)")
    assert bg_rate >= THRESHOLD and shape_rate >= THRESHOLD


def test_detail_guidance_runs_on_the_shipped_spec(shipped):
    """DG (the stored MA spec, one batched call per step) keeps the colours of 8 prompts."""
    prompts, colour, background = prompt_set()
    images = tiny.generate(shipped, prompts[:8], seed=list(range(8)), steps=STEPS, cfg=CFG, dg=1.0)
    got_background, got_shape = shapes.read_colours(images)
    assert (got_background == background[:8]).float().mean() >= THRESHOLD
    assert (got_shape == colour[:8]).float().mean() >= THRESHOLD - 0.125
