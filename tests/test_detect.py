"""Layout, family and config from keys and shapes only, on every official variant."""
import pytest

import mmdit
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect

import peers

PRESETS = list(peers.FULL)


def variants(name):
    """(layout, prefix, {key: shape}) for the official files of ``name``: diffusers folder, the
    original single file (SD3: prefixed, with text encoders and VAE; FLUX: BFL, no prefix), and
    a ComfyUI-style prefixed FLUX file."""
    dsd, _ = peers.full_size(name)
    cfg = mmdit.preset(name)
    ours = keymaps.from_diffusers(dsd, cfg.family, cfg.hidden_size)
    out = [("diffusers", "", {k: tuple(v.shape) for k, v in dsd.items()})]
    if cfg.family == "sd3":
        orig = {"model.diffusion_model." + k: tuple(v.shape) for k, v in ours.items()}
        orig.update({k: s for k, s in peers.EXTRAS.items()})
        out.append(("original", "model.diffusion_model.", orig))
    else:
        out.append(("original", "", {k: tuple(v.shape) for k, v in ours.items()}))
        prefixed = {"model.diffusion_model." + k: tuple(v.shape) for k, v in ours.items()}
        prefixed.update(peers.FLUX_EXTRAS)
        out.append(("original", "model.diffusion_model.", prefixed))
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_every_official_variant_is_classified(name):
    for layout, prefix, shapes in variants(name):
        det = detect(shapes)
        assert (det.layout, det.prefix, det.family) == (layout, prefix, mmdit.PRESETS[name].family), (layout, prefix)
        assert det.config == mmdit.PRESETS[name]
        assert det.preset == name
        assert det.config_source == "shapes"
        assert not any(k.startswith(("text_encoders.", "first_stage_model.", "vae.")) for k in det.keys)


@pytest.mark.parametrize("name", PRESETS)
def test_diffusers_config_json_is_read_instead_of_shapes(name):
    dsd, config = peers.full_size(name)
    det = detect({k: tuple(v.shape) for k, v in dsd.items()},
                 config_json={**config, "_class_name": peers.FULL[name][0]})
    assert det.config_source == "config.json"
    assert det.config == mmdit.PRESETS[name] and det.preset == name


def test_other_components_are_counted_not_loaded():
    shapes = variants("sd3.5-medium")[1][2]
    det = detect(shapes)
    assert det.ignored == {"text_encoders.clip_l": 1, "text_encoders.clip_g": 1, "text_encoders.t5xxl": 1,
                           "first_stage_model": 2}


def small_shapes(peer, layout):
    sd = peers.diffusers_state(peer) if layout == "diffusers" else peers.original_state(peer, "")
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_sd3_head_dim_comes_from_qk_norm_else_the_64_rule():
    det = detect(small_shapes(peers.sd3_peer(heads=3, head_dim=32, qk_norm=True), "original"))
    assert (det.config.num_heads, det.config.head_dim) == (3, 32)
    # without qk-norm the shapes can't tell: hidden 128 reads as 2 heads of 64 (Stability's rule)
    det = detect(small_shapes(peers.sd3_peer(heads=4, head_dim=32), "diffusers"))
    assert (det.config.num_heads, det.config.head_dim) == (2, 64)
    # ... and a config.json settles it
    peer = peers.sd3_peer(heads=4, head_dim=32)
    det = detect(small_shapes(peer, "diffusers"), config_json=dict(peer.config, _class_name="SD3Transformer2DModel"))
    assert (det.config.num_heads, det.config.head_dim) == (4, 32)


def test_flux_head_dim_other_than_128_needs_axes():
    shapes = small_shapes(peers.flux_peer(heads=2, head_dim=64, axes=(8, 28, 28)), "original")
    with pytest.raises(CheckpointError, match=r"axes_dim.*head_dim 128"):
        detect(shapes)
    det = detect(shapes, config={"axes_dim": (8, 28, 28)})
    assert (det.config.num_heads, det.config.head_dim, det.config.axes_dim) == (2, 64, (8, 28, 28))


def test_any_prefix_most_frequent_wins():
    shapes = small_shapes(peers.flux_peer(heads=1, guidance=False), "original")
    odd = {"diffusion_model." + k: s for k, s in shapes.items()}
    odd["img_in.weight"] = (1, 1)  # a stray key elsewhere doesn't steal the prefix
    det = detect(odd)
    assert det.prefix == "diffusion_model." and det.family == "flux"
    assert "img_in.weight" in det.keys  # kept, so the strict load reports it as unexpected


@pytest.mark.parametrize("keys, what", [
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 16, 3, 3)}, "VAE"),
    ({"text_model.embeddings.token_embedding.weight": (49408, 768)}, "CLIP"),
    ({"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}, "T5"),
    ({"first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3)}, "no transformer"),
])
def test_not_a_transformer_says_what_it_looks_like(keys, what):
    with pytest.raises(CheckpointError, match=f"not an SD3 / SD3.5 / FLUX.1 .*transformer.*{what}"):  # and the other families
        detect(keys, where="thing.safetensors")


def test_given_config_of_the_wrong_family_is_refused():
    shapes = small_shapes(peers.sd3_peer(), "original")
    with pytest.raises(CheckpointError, match="sd3 transformer, but the config given is flux"):
        detect(shapes, config=mmdit.preset("flux.1-dev"))
