"""Model-level behaviour that needs no peer: presets, shapes, row independence, errors."""
import pytest
import torch

import mmdit
from helpers import TOL, inputs, tiny

# Learned parameter counts of the official checkpoints (docs/architecture.md), pos_embed excluded.
OFFICIAL_PARAMS = {
    "sd3-medium": 2_028_328_000,
    "sd3.5-medium": 2_243_171_520,
    "sd3.5-large": 8_056_627_520,
    "flux.1-dev": 11_901_408_320,
    "flux.1-schnell": 11_891_178_560,
    "flux.2-dev": 32_223_281_152,
    "flux.2-klein-4b": 3_875_544_576,
    "flux.2-klein-9b": 9_078_581_248,
    "qwen-image": 20_430_401_088,
    "qwen-image-2.1": 7_115_124_736,
    "chroma": 8_899_983_424,  # Chroma1-HD
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_preset_parameter_counts_match_official(name):
    model = mmdit.build_transformer(name, device="meta")
    learned = sum(p.numel() for p in model.parameters())
    assert learned == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rows_are_independent_and_shapes_follow_latents(family):
    model = tiny(family)
    x, sigma, ctx, pooled, g = inputs(model)
    with torch.no_grad():
        full = model(x, sigma, ctx, pooled, guidance=g)
        one = model(x[1:2], sigma[1:2], ctx[1:2], pooled[1:2], guidance=None if g is None else g[1:2])
    assert full.shape == x.shape
    err = (full[1:2] - one).abs().max() / one.abs().max()
    assert err <= TOL


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_odd_latent_size_is_a_clear_error(family):
    model = tiny(family)
    x, sigma, ctx, pooled, g = inputs(model, H=11)
    with pytest.raises(ValueError, match="multiple of 16|multiple of the patch size"):
        model(x, sigma, ctx, pooled, guidance=g)


def test_flux_dev_without_guidance_is_a_clear_error():
    model = tiny("flux")
    x, sigma, ctx, pooled, _ = inputs(model)
    with pytest.raises(ValueError, match="pass guidance"):
        model(x, sigma, ctx, pooled)


def test_sd3_latent_larger_than_position_table_is_a_clear_error():
    model = tiny("sd3")
    x, sigma, ctx, pooled, _ = inputs(model, H=34, W=10)
    with pytest.raises(ValueError, match="larger than this model's position table"):
        model(x, sigma, ctx, pooled)


def test_unknown_preset_and_field_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        mmdit.build_transformer("sd4")
    with pytest.raises(ValueError, match="unknown config field"):
        mmdit.build_transformer("sd3-medium", depth=2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_wrong_context_width_names_the_expected_one(family):
    model = tiny(family)
    x, sigma, ctx, pooled, g = inputs(model)
    with pytest.raises(ValueError, match=r"this model takes context \(B, L, 24\) and pooled \(B, 20\)"):
        model(x, sigma, torch.randn(3, 7, 4096), pooled, guidance=g)
