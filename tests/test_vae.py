"""VAE: parity with diffusers' AutoencoderKL from every layout; the LDM <-> diffusers key map both ways."""
import json

import pytest
import torch

from helpers import rel_err, save_safetensors
from mmdit.encoders.vae import VAE, VAE_PRESETS, VAEConfig, vae_config
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.encoders import load_vae, vae_key, vae_to_diffusers, vae_to_ldm

diffusers = pytest.importorskip("diffusers")
TOL = 1e-4


def _diffusers_vae(channels, layers=1, latent=16, scaling=1.5305, shift=0.0609):
    n = len(channels)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=channels,
                                   down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n,
                                   layers_per_block=layers, norm_num_groups=32, use_quant_conv=False,
                                   use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return _diffusers_vae((32, 64, 64)).eval()  # 3 levels: channel change, shortcut, reversed up index


def _check(ours, ref):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 24, generator=g) * 2 - 1  # non-square, odd latent width
    z = torch.randn(2, 16, 5, 3, generator=g)
    with torch.no_grad():
        errs = {"encode": rel_err(ours.encode(x), ref.encode(x).latent_dist.mean),
                "decode": rel_err(ours.decode(z), ref.decode(z).sample)}
    assert max(errs.values()) <= TOL, errs
    return errs


def test_diffusers_folder(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.config.channels == (32, 64, 64) and ours.config.layers_per_block == 1
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (1.5305, 0.0609)  # from config.json
    _check(ours, ref)
    (tmp_path / "model_index.json").write_text("{}")  # the pipeline root picks vae/
    flux = load_vae(tmp_path, family="flux")
    assert (flux.config.scaling_factor, flux.config.shift_factor) == (0.3611, 0.1159)


def test_ldm_file_proven_by_diffusers_converter(ref, tmp_path):
    """ae.safetensors (LDM names) written with our map; diffusers' own converter reads it back exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = vae_to_ldm(ref.state_dict(), levels=3)
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.2.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    back = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    sd = ref.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    path = save_safetensors(ldm, tmp_path / "ae.safetensors")
    ours = load_vae(path, family="flux")
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.3611, 0.1159)
    _check(ours, ref)
    with pytest.raises(CheckpointError, match="family='sd3' or family='flux'"):
        load_vae(path)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_all_in_one_prefix(ref, tmp_path, prefix):
    sd = {prefix + k: v for k, v in vae_to_ldm(ref.state_dict(), levels=3).items()}
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2, 2)
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(2)
    path = save_safetensors(sd, tmp_path / "sd3_medium.safetensors")
    if prefix == "first_stage_model.":
        ours = load_vae(path)  # Stability files: the SD3 scaling
        assert (ours.config.scaling_factor, ours.config.shift_factor) == (1.5305, 0.0609)
    else:
        ours = load_vae(path, family="flux")
    _check(ours, ref)


def test_diffusers_named_single_file_and_bf16(ref, tmp_path):
    path = save_safetensors(ref.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    ours = load_vae(path, dtype=torch.bfloat16, family="sd3")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert torch.equal(ours.decoder.mid.attn_1.proj_out.weight.float()[:, :, 0, 0],
                       ref.decoder.mid_block.attentions[0].to_out[0].weight.bfloat16().float())


def test_keymap_both_directions_full_size():
    """Real SD3/FLUX VAE: our (LDM) names -> diffusers -> ours is the identity, and the diffusers
    names and shapes are exactly diffusers' own (244 tensors)."""
    with torch.device("meta"):
        ours = VAE(VAE_PRESETS["sd3"]).state_dict()
        theirs = _diffusers_vae((128, 256, 512, 512), layers=2).state_dict()
    assert len(ours) == len(theirs) == 244
    as_diffusers = vae_to_diffusers(ours, levels=4)
    assert {k: tuple(v.shape) for k, v in as_diffusers.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = vae_to_ldm(as_diffusers, levels=4)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(vae_key(vae_key(k, 4, "diffusers"), 4, "ldm") == k for k in ours)
    assert vae_key("decoder.up.3.block.2.conv1.weight", 4, "diffusers") == "decoder.up_blocks.0.resnets.2.conv1.weight"
    shortcut = vae_key("decoder.up_blocks.2.resnets.0.conv_shortcut.bias", 4, "ldm")
    assert shortcut == "decoder.up.1.block.0.nin_shortcut.bias"
    with torch.device("meta"):  # docs/architecture.md, parameter counts
        model = VAE(vae_config("flux"))
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_274_208
    assert sum(p.numel() for p in model.decoder.parameters()) == 49_545_475
    assert model.config.downsample == 8


def test_errors(ref, tmp_path):
    ldm = vae_to_ldm(ref.state_dict(), levels=3)
    missing = {k: v for k, v in ldm.items() if k != "decoder.up.1.block.1.conv2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 key.*decoder\.up\.1\.block\.1\.conv2\.bias") as e:
        load_vae(save_safetensors(missing, tmp_path / "missing.safetensors"), family="sd3")
    assert "LDM VAE" in str(e.value)
    wrong = {**ldm, "encoder.mid.attn_1.k.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.mid\.attn_1\.k\.weight"):
        load_vae(save_safetensors(wrong, tmp_path / "wrong.safetensors"), family="sd3")
    dif = {**ref.state_dict(), "encoder.mystery.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*encoder\.mystery") as e:
        load_vae(save_safetensors(dif, tmp_path / "dif.safetensors"), family="sd3")
    assert "unexpected 1 key" in str(e.value) and "diffusers VAE" in str(e.value)
    with pytest.raises(CheckpointError, match="holds no VAE"):
        load_vae(save_safetensors({"shared.weight": torch.zeros(2)}, tmp_path / "t5.safetensors"), family="sd3")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "ae_missing.safetensors")
    (tmp_path / "ae.pt").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_vae(tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="family must be"):
        load_vae(tmp_path / "ae.pt", family="sdxl")
    folder = tmp_path / "quant"
    _diffusers_vae((32,), latent=4).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": True}))
    with pytest.raises(CheckpointError, match="quant convs"):
        load_vae(folder)


def test_config_checks():
    with pytest.raises(ValueError, match="multiples of norm_groups"):
        VAEConfig(channels=(48, 64))
    with pytest.raises(ValueError, match="unknown VAE preset"):
        vae_config("sdxl")
