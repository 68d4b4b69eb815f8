"""Qwen-Image 1.0 / 2.1 VAEs: parity with diffusers' AutoencoderKLQwenImage / AutoencoderKLQwenImage21
(one frame) + the pipelines' per-channel latent normalisation, from every layout (diffusers folder /
file, ComfyUI's Wan-named files, ``vae.`` prefix); the Wan <-> diffusers key maps; errors."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import rel_err, save_safetensors  # noqa: E402
from peers_vae import qwen21_peer, qwen_arch, qwen_decode, qwen_encode, qwen_peer, save_wan, to_wan  # noqa: E402

from mmdit import load_vae  # noqa: E402
from mmdit.encoders.qwen21_vae import QWEN_IMAGE_21_VAE_PRESETS, QwenImage21VAE, QwenImage21VAEConfig  # noqa: E402
from mmdit.encoders.wan_vae import QWEN_IMAGE_VAE_PRESETS, QwenImageVAE, QwenImageVAEConfig  # noqa: E402
from mmdit.weights.checkpoint import CheckpointError  # noqa: E402
from mmdit.weights.wan_vae import fold_shape, wan_key  # noqa: E402

TOL = 1e-5  # fp32, relative to the reference's largest value


@pytest.fixture(scope="module", params=["qwen-image", "qwen-image-2.1"])
def ref(request):
    return qwen_peer() if request.param == "qwen-image" else qwen21_peer()


def _check(ours, ref, normalized: bool = True) -> dict[str, float]:
    """Image -> latents and back; ``normalized``: through the pipeline's statistics (the file's own:
    a file without config.json gets the preset's, so then compare the raw latents)."""
    cfg, g = ours.config, torch.Generator().manual_seed(2)
    d, z_dim = cfg.downsample, cfg.latent_channels
    x = torch.rand(2, cfg.in_channels, 2 * d, 3 * d, generator=g) * 2 - 1  # non-square
    z = torch.randn(2, z_dim, 2, 3, generator=g)
    with torch.no_grad():
        if normalized:
            errs = {"encode": rel_err(ours.normalize(ours.encode(x)), qwen_encode(ref, x)),
                    "decode": rel_err(ours.decode(ours.denormalize(z)), qwen_decode(ref, z))}
        else:
            errs = {"encode": rel_err(ours.encode(x), ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]),
                    "decode": rel_err(ours.decode(z), ref.decode(z[:, :, None]).sample[:, :, 0])}
    assert max(errs.values()) <= TOL, errs
    return errs


def test_diffusers_folder_and_pipeline_root(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    cfg = ours.config
    assert cfg.latents_mean == tuple(ref.config.latents_mean) and cfg.latents_std == tuple(ref.config.latents_std)
    if qwen_arch(ref) == "qwen-image":
        assert isinstance(ours, QwenImageVAE) and (cfg.latent_channels, cfg.downsample, cfg.in_channels) == (16, 8, 3)
        assert cfg.temporal_downsample == (False, True, True) and cfg.dim_mult == (1, 2, 4, 4)
    else:
        assert isinstance(ours, QwenImage21VAE) and (cfg.latent_channels, cfg.downsample) == (64, 16)
        assert (cfg.in_channels, cfg.out_channels, cfg.decoder_base_dim) == (4, 4, 12)
    _check(ours, ref)
    (tmp_path / "model_index.json").write_text("{}")
    _check(load_vae(tmp_path, family=qwen_arch(ref)), ref)


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_wan_names_comfyui(ref, tmp_path, prefix):
    """ComfyUI's files: Wan's original names (2.1: Wan 2.2's, convs with a time axis of 1); no config.json,
    so the architecture comes from the shapes and the statistics from the preset."""
    path = save_wan(ref, tmp_path / "qwen_image_vae.safetensors", prefix, time_axis=qwen_arch(ref) == "qwen-image-2.1")
    ours = load_vae(path)
    preset = {**QWEN_IMAGE_VAE_PRESETS, **QWEN_IMAGE_21_VAE_PRESETS}[qwen_arch(ref)]
    assert ours.config == type(preset)(**{**vars(preset), **{k: _cfg(ref, k) for k in _arch_fields(preset)}})
    _check(ours, ref, normalized=False)


def _arch_fields(preset) -> list[str]:
    return [k for k in vars(preset) if k not in ("latents_mean", "latents_std")]


def _cfg(ref, field):
    names = {"temporal_downsample": "temperal_downsample", "in_channels": "input_channels"}
    value = ref.config.get(names.get(field, field), ref.config.get(field))
    return tuple(value) if isinstance(value, list) else value


def test_diffusers_named_file(ref, tmp_path):
    """The diffusers file alone (no config.json): shapes + preset statistics; bf16 casting."""
    path = save_safetensors(ref.state_dict(), tmp_path / "vae" / "qwen_vae.safetensors")
    _check(load_vae(path, family=qwen_arch(ref)), ref, normalized=False)
    half = load_vae(path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_wan21_names_proven_by_diffusers_converter(tmp_path):
    """Our 1.0 Wan names, read back by diffusers' own convert_wan_vae_to_diffusers, are the diffusers
    state dict exactly (its converter assumes the real 4 stages x 2 resnets, which qwen_peer keeps)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = qwen_peer()
    wan = to_wan(ref)
    assert "decoder.upsamples.4.shortcut.weight" in wan and "decoder.upsamples.7.time_conv.weight" in wan
    assert "encoder.downsamples.5.time_conv.bias" in wan and "decoder.upsamples.11.resample.1.bias" in wan
    back = convert_wan_vae_to_diffusers(wan)
    sd = ref.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_wan22_names_of_qwen_image_21():
    """2.1 under Wan 2.2's names (ComfyUI's file): one of each kind, as Wan 2.2's modules name them
    (Down_ResidualBlock.downsamples / Up_ResidualBlock.upsamples, the resampler after the resnets)."""
    r = QWEN_IMAGE_21_VAE_PRESETS["qwen-image-2.1"].num_res_blocks
    pairs = [("quant_conv.weight", "conv1.weight"), ("post_quant_conv.bias", "conv2.bias"),
             ("encoder.conv_in.weight", "encoder.conv1.weight"), ("decoder.norm_out.gamma", "decoder.head.0.gamma"),
             ("decoder.conv_out.weight", "decoder.head.2.weight"),
             ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.middle.1.to_qkv.weight"),
             ("decoder.mid_block.resnets.1.conv2.bias", "decoder.middle.2.residual.6.bias"),
             ("encoder.down_blocks.4.resnets.0.conv1.weight", "encoder.downsamples.4.downsamples.0.residual.2.weight"),
             ("encoder.down_blocks.1.downsampler.resample.1.weight",
              "encoder.downsamples.1.downsamples.2.resample.1.weight"),
             ("encoder.down_blocks.1.downsampler.time_conv.bias", "encoder.downsamples.1.downsamples.2.time_conv.bias"),
             ("decoder.up_blocks.4.resnets.0.conv_shortcut.weight", "decoder.upsamples.4.upsamples.0.shortcut.weight"),
             ("decoder.up_blocks.1.resnets.2.norm2.gamma", "decoder.upsamples.1.upsamples.2.residual.3.gamma"),
             ("decoder.up_blocks.0.upsampler.resample.1.weight", "decoder.upsamples.0.upsamples.3.resample.1.weight"),
             ("decoder.up_blocks.2.upsampler.time_conv.weight", "decoder.upsamples.2.upsamples.3.time_conv.weight")]
    for ours, wan in pairs:
        assert wan_key(ours, "qwen-image-2.1", r, "wan") == wan and wan_key(wan, "qwen-image-2.1", r, "ours") == ours


@pytest.mark.parametrize("arch", ["qwen-image", "qwen-image-2.1"])
def test_keymap_and_shapes_full_size(arch):
    """Real size: our tensors + the video-only ones are diffusers' (194 / 238), each our 2-D shape being
    the diffusers shape folded (last temporal tap); ours -> Wan -> ours is the identity."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLQwenImage21

    with torch.device("meta"):
        if arch == "qwen-image":
            model, theirs = QwenImageVAE(QwenImageVAEConfig()), AutoencoderKLQwenImage().state_dict()
        else:
            model, theirs = QwenImage21VAE(QwenImage21VAEConfig()), AutoencoderKLQwenImage21().state_dict()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    video = model.video_only()
    assert len(theirs) == (194 if arch == "qwen-image" else 238) == len(ours) + len(video)
    assert {k: fold_shape(k, tuple(v.shape)) for k, v in theirs.items()} == {**ours, **video}
    r = model.config.num_res_blocks
    wan = {k: wan_key(k, arch, r, "wan") for k in theirs}
    assert None not in wan.values() and len(set(wan.values())) == len(wan)
    assert all(wan_key(w, arch, r, "ours") == k for k, w in wan.items())
    if arch == "qwen-image-2.1":  # the notes' count, time_convs included
        assert sum(v.numel() for v in theirs.values()) == 337_740_404
        assert sum(p.numel() for p in model.parameters()) + sum(
            torch.Size(s).numel() for s in video.values()) == 337_740_404


def test_rgba_and_geometry():
    cfg = QWEN_IMAGE_21_VAE_PRESETS["qwen-image-2.1"]
    assert (cfg.in_channels, cfg.out_channels, cfg.latent_channels, cfg.downsample) == (4, 4, 64, 16)
    assert len(cfg.latents_mean) == len(cfg.latents_std) == 64
    cfg = QWEN_IMAGE_VAE_PRESETS["qwen-image"]
    assert (cfg.in_channels, cfg.out_channels, cfg.latent_channels, cfg.downsample) == (3, 3, 16, 8)
    with pytest.raises(ValueError, match="do not divide"):
        QwenImage21VAEConfig(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=(1, 2, 2, 4),
                             temporal_downsample=(True, False, True), latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8)
    with pytest.raises(ValueError, match="latents_mean / latents_std have 16 / 16 entries; z_dim is 4"):
        QwenImageVAEConfig(z_dim=4)


def test_errors(tmp_path):
    ref = qwen_peer()
    path = save_wan(ref, tmp_path / "qwen_image_vae.safetensors")
    with pytest.raises(CheckpointError, match="holds the qwen-image VAE, not the qwen-image-2.1 one"):
        load_vae(path, family="qwen-image-2.1")
    with pytest.raises(CheckpointError, match="holds the qwen-image VAE, not the flux2 one; pass family=.qwen-image."):
        load_vae(path, family="flux2")
    wan = to_wan(ref)
    no_time = {k: v for k, v in wan.items() if k != "decoder.upsamples.3.time_conv.weight"}
    with pytest.raises(CheckpointError, match=r"Wan 2\.1 \(ComfyUI\) names(.|\n)*missing 1 key.*"
                                              r"decoder\.upsamples\.3\.time_conv\.weight \(64, 32, 1, 1\)") as e:
        load_vae(save_safetensors(no_time, tmp_path / "no_time.safetensors"))
    assert "unexpected" not in str(e.value)
    bad = {**wan, "encoder.middle.1.proj.weight": torch.zeros(32, 32, 3, 3)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.middle\.1\.proj\.weight"):
        load_vae(save_safetensors(bad, tmp_path / "bad.safetensors"))
    extra = {**wan, "encoder.middle.3.gamma": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*encoder\.middle\.3\.gamma"):
        load_vae(save_safetensors(extra, tmp_path / "extra.safetensors"))
    small = qwen_peer(z=4)
    with pytest.raises(CheckpointError, match="4 latent channels, the qwen-image preset's statistics 16"):
        load_vae(save_wan(small, tmp_path / "z4.safetensors"))
    folder = tmp_path / "v21"
    qwen21_peer().save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for bad_cfg, message in [({"patch_size": 2}, "unpatchified"), ({"is_residual": False}, "residual"),
                             ({"attn_scales": [0.5]}, "attn_scales")]:
        (folder / "config.json").write_text(json.dumps({**cfg, **bad_cfg}))
        with pytest.raises(CheckpointError, match=message):
            load_vae(folder)


def test_one_graph():
    """encode + normalize and denormalize + decode trace as one graph each (no data-dependent Python).
    The 2.1 VAE holds every layer kind of 1.0's too (resnets, attention, both resamplers) and the shortcuts."""
    torch._dynamo.reset()
    cfg = QwenImage21VAEConfig(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=(1, 1), temporal_downsample=(True,))
    vae = QwenImage21VAE(cfg).eval()
    x = torch.rand(1, cfg.in_channels, 2 * cfg.downsample, 2 * cfg.downsample) * 2 - 1
    with torch.no_grad():
        for fn, arg in [(lambda a: vae.normalize(vae.encode(a)), x),
                        (lambda a: vae.decode(vae.denormalize(a)), torch.randn(1, cfg.latent_channels, 2, 2))]:
            explained = torch._dynamo.explain(fn)(arg)
            assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_pipeline_calls(ref, tmp_path):
    """What the pipelines call: image_modes.encode and Pipeline.decode, through normalize / denormalize
    (2.1: RGBA in and out)."""
    from types import SimpleNamespace

    from mmdit import image_modes
    from mmdit.pipeline import Pipeline

    ref.save_pretrained(tmp_path / "vae")
    pipe = SimpleNamespace(vae=load_vae(tmp_path / "vae"))
    cfg, g = pipe.vae.config, torch.Generator().manual_seed(3)
    images = torch.rand(1, cfg.in_channels, 2 * cfg.downsample, cfg.downsample, generator=g)
    assert rel_err(image_modes.encode(pipe, images), qwen_encode(ref, images * 2 - 1)) <= TOL
    z = torch.randn(1, cfg.latent_channels, 2, 1, generator=g)
    assert rel_err(Pipeline.decode(pipe, z), (qwen_decode(ref, z) / 2 + 0.5).clamp(0, 1)) <= TOL
