"""FLUX.2's VAE: parity with diffusers' AutoencoderKLFlux2 + Flux2Pipeline's latent normalisation,
from every layout (diffusers folder / file, BFL ae.safetensors, ComfyUI prefix); the key map; errors."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import rel_err, save_safetensors  # noqa: E402
from peers_vae import flux2_decode, flux2_encode, flux2_peer  # noqa: E402

from mmdit import load_vae  # noqa: E402
from mmdit.encoders.vae import VAE, VAE_PRESETS, patchify, unpatchify  # noqa: E402
from mmdit.weights.checkpoint import CheckpointError  # noqa: E402
from mmdit.weights.encoders import vae_key, vae_to_diffusers, vae_to_ldm  # noqa: E402

TOL = 1e-5  # fp32, relative to the reference's largest value
LEVELS = 3


@pytest.fixture(scope="module")
def ref():
    return flux2_peer()


def _check(ours, ref) -> dict[str, float]:
    """Image -> normalised patchified latents and back, against the pipeline's own steps."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1  # latents 4 x 6 after the 2x2 patchify
    z = torch.randn(2, 16, 4, 6, generator=g)
    with torch.no_grad():
        latents = ours.normalize(ours.encode(x))
        errs = {"encode": rel_err(latents, flux2_encode(ref, x)),
                "decode": rel_err(ours.decode(ours.denormalize(z)), flux2_decode(ref, z))}
    assert latents.shape == (2, ours.config.latent_channels, 32 // ours.config.downsample, 48 // ours.config.downsample)
    assert max(errs.values()) <= TOL, errs
    return errs


def _bfl(ref) -> dict[str, torch.Tensor]:
    """ae.safetensors: BFL's names, 1x1 attention convs (num_batches_tracked dropped, as some files do)."""
    sd = {k: v for k, v in ref.state_dict().items() if k != "bn.num_batches_tracked"}
    return vae_to_ldm(sd, levels=LEVELS)


def test_diffusers_folder_and_pipeline_root(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    cfg = ours.config
    assert (cfg.latent_channels, cfg.z_channels, cfg.patch_size, cfg.downsample) == (16, 4, 2, 8)
    assert cfg.channels == (32, 64, 64) and cfg.quant_conv and cfg.batch_norm_eps == 1e-4
    assert ours.bn.running_var.dtype == torch.float32
    _check(ours, ref)
    (tmp_path / "model_index.json").write_text("{}")
    _check(load_vae(tmp_path, family="flux2"), ref)


def test_bfl_file(ref, tmp_path):
    """BFL names, shapes only (no config.json): eps from the preset, z and patch from the bn shapes."""
    path = save_safetensors(_bfl(ref), tmp_path / "ae.safetensors")
    ours = load_vae(path)
    assert ours.config.batch_norm_eps == VAE_PRESETS["flux2"].batch_norm_eps
    assert torch.equal(ours.encoder.quant_conv.weight, ref.quant_conv.weight)
    assert torch.equal(ours.decoder.post_quant_conv.bias, ref.post_quant_conv.bias)
    _check(ours, ref)


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_diffusers_named_file_and_prefix(ref, tmp_path, prefix):
    """diffusers has no single-file loader for this VAE; we read its names (num_batches_tracked
    included) in a file of their own, or under ComfyUI's vae. prefix next to other models."""
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    if prefix:
        sd["model.diffusion_model.img_in.weight"] = torch.zeros(2, 2)
    _check(load_vae(save_safetensors(sd, tmp_path / "flux2_vae.safetensors"), family="flux2"), ref)


def test_bf16_keeps_statistics_fp32(ref, tmp_path):
    ours = load_vae(save_safetensors(_bfl(ref), tmp_path / "ae.safetensors"), dtype=torch.bfloat16)
    assert ours.encoder.conv_in.weight.dtype == torch.bfloat16
    assert ours.bn.running_mean.dtype == torch.float32 and torch.equal(ours.bn.running_mean, ref.bn.running_mean)
    z = torch.randn(1, 16, 2, 3)
    assert ours.denormalize(z.bfloat16()).dtype == torch.bfloat16  # computed in fp32, returned as given
    assert rel_err(ours.normalize(ours.denormalize(z)), z) <= 1e-6


def test_patchify_order_is_bfl_and_diffusers():
    """Channel c*4 + ph*2 + pw (BFL's rearrange, diffusers' _patchify_latents); unpatchify inverts it."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = torch.randn(2, 3, 6, 8)
    p = patchify(z, 2)
    assert torch.equal(p, Flux2Pipeline._patchify_latents(z))
    assert torch.equal(p[:, 1 * 4 + 1 * 2 + 0, 2, 3], z[:, 1, 2 * 2 + 1, 3 * 2])
    assert torch.equal(unpatchify(p, 2), z)


def test_keymap_full_size():
    """Real FLUX.2 VAE: BFL names -> diffusers -> BFL is the identity; the diffusers names and shapes
    are AutoencoderKLFlux2's own (251 with num_batches_tracked, which we do not keep); the FLUX.2
    rows are the ones of diffusers' scripts/convert_flux2_to_diffusers.py."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ours = VAE(VAE_PRESETS["flux2"]).state_dict()
        theirs = AutoencoderKLFlux2().state_dict()
    assert len(ours) == 250 and len(theirs) == 251
    theirs.pop("bn.num_batches_tracked")
    as_diffusers = vae_to_diffusers(ours, levels=4)
    assert {k: tuple(v.shape) for k, v in as_diffusers.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert all(vae_key(vae_key(k, 4, "diffusers"), 4, "ldm") == k for k in ours)
    for bfl, dif in [("encoder.quant_conv.weight", "quant_conv.weight"),
                     ("decoder.post_quant_conv.bias", "post_quant_conv.bias"),
                     ("bn.running_mean", "bn.running_mean"), ("bn.running_var", "bn.running_var")]:
        assert vae_key(bfl, 4, "diffusers") == dif and vae_key(dif, 4, "ldm") == bfl
    assert ours["bn.running_mean"].shape == (128,) and ours["encoder.quant_conv.weight"].shape == (64, 64, 1, 1)
    cfg = VAE_PRESETS["flux2"]
    assert (cfg.latent_channels, cfg.z_channels, cfg.downsample) == (128, 32, 16)


def test_errors(ref, tmp_path):
    path = save_safetensors(_bfl(ref), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="holds a FLUX.2 VAE.*pass family='flux2' or omit it"):
        load_vae(path, family="flux")
    missing = {k: v for k, v in _bfl(ref).items() if k != "bn.running_var"}
    with pytest.raises(CheckpointError, match=r"missing 1 key.*bn\.running_var"):
        load_vae(save_safetensors(missing, tmp_path / "missing.safetensors"))
    one_conv = {k: v for k, v in _bfl(ref).items() if not k.startswith("decoder.post_quant_conv.")}
    with pytest.raises(CheckpointError, match="only one of encoder.quant_conv"):
        load_vae(save_safetensors(one_conv, tmp_path / "one_conv.safetensors"))
    flux1 = {k: v for k, v in _bfl(ref).items() if not k.startswith(("bn.", "encoder.quant", "decoder.post"))}
    with pytest.raises(CheckpointError, match="holds no FLUX.2 VAE"):
        load_vae(save_safetensors(flux1, tmp_path / "flux1.safetensors"), family="flux2")
    with pytest.raises(CheckpointError, match="holds no Qwen-Image VAE"):
        load_vae(path, family="qwen-image")
    folder = tmp_path / "vae"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "patch_size": [1, 1]}))
    with pytest.raises(CheckpointError, match="patch_size"):
        load_vae(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "decoder_block_out_channels": [32, 32, 64]}))
    with pytest.raises(CheckpointError, match="decoder_block_out_channels"):
        load_vae(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderDC"}))
    with pytest.raises(CheckpointError, match="is a AutoencoderDC; the VAEs loaded here are"):
        load_vae(folder)


def test_pipeline_calls(ref, tmp_path):
    """What the pipelines call: image_modes.encode (images in [0, 1] -> normalised latents) and
    Pipeline.decode (latents -> images in [0, 1]) reach the same numbers through normalize / denormalize."""
    from types import SimpleNamespace

    from mmdit import image_modes
    from mmdit.pipeline import Pipeline

    pipe = SimpleNamespace(vae=load_vae(save_safetensors(_bfl(ref), tmp_path / "ae.safetensors")))
    images = torch.rand(1, 3, 32, 16, generator=torch.Generator().manual_seed(3))
    assert rel_err(image_modes.encode(pipe, images), flux2_encode(ref, images * 2 - 1)) <= TOL
    z = torch.randn(1, 16, 4, 2, generator=torch.Generator().manual_seed(4))
    assert rel_err(Pipeline.decode(pipe, z), (flux2_decode(ref, z) / 2 + 0.5).clamp(0, 1)) <= TOL
