"""load_transformer on every checkpoint layout: outputs equal diffusers' on the same weights.

Each case writes a random diffusers peer in one layout, loads it with ``load_transformer``
and compares fp32 outputs (batch 3, a different sigma per row, text length 7, a 12x10
latent; SD3 crops a smaller 8x8 position table) at max|ours - peer| / max|peer| <= 1e-4.
Files in fp16 / bf16 / fp8 are compared against the peer run on the same rounded weights.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmdit
from mmdit.cli import main as cli_main
from mmdit.weights import hub
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.transformer import load_transformer

import peers

TOL = 1e-4

# the peers: SD3.5-medium-like (qk-norm, dual attention), SD3-medium-like, FLUX dev / schnell
SD35M = dict(num_layers=3, heads=2, head_dim=64, qk_norm=True, dual=(0, 1))
SD3M = dict(num_layers=2, heads=2, head_dim=64)
SD3_ODD = dict(num_layers=2, heads=3, head_dim=32)  # head_dim only a config.json can tell
DEV = dict(num_double=1, num_single=2, heads=2, guidance=True)
SCHNELL = dict(num_double=2, num_single=1, heads=1, guidance=False)


def write_diffusers_folder(peer, tmp, dtype):
    return peers.save_diffusers_folder(peer, tmp / "folder")


def write_sharded(peer, tmp, dtype):
    folder = peers.save_diffusers_folder(peer, tmp / "sharded", max_shard_size="200KB", pipeline=True)
    shards = list((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (folder / "transformer/diffusion_pytorch_model.safetensors.index.json").exists()
    return folder


def write_diffusers_file(peer, tmp, dtype):
    return peers.save_diffusers_file(peer, tmp / "diffusers_keys.safetensors", dtype)


def write_original(peer, tmp, dtype):  # Stability all-in-one: prefix + text encoders + VAE beside it
    return peers.save_original(peer, tmp / "original.safetensors", dtype=dtype)


def write_bfl(peer, tmp, dtype):  # BFL flux1-*.safetensors: no prefix, nothing else
    return peers.save_original(peer, tmp / "flux1.safetensors", prefix="", with_extras=False, dtype=dtype)


CASES = {  # id: (family, peer config, writer, file dtype)
    "sd3-diffusers-folder": ("sd3", SD3_ODD, write_diffusers_folder, None),
    "sd3.5m-diffusers-sharded": ("sd3", SD35M, write_sharded, None),
    "sd3-diffusers-file": ("sd3", SD3M, write_diffusers_file, None),
    "sd3.5m-original-prefixed": ("sd3", SD35M, write_original, None),
    "sd3-original-fp16": ("sd3", SD3M, write_original, torch.float16),
    "sd3.5m-diffusers-file-fp8": ("sd3", SD35M, write_diffusers_file, torch.float8_e4m3fn),
    "flux-dev-diffusers-folder": ("flux", DEV, write_diffusers_folder, None),
    "flux-schnell-diffusers-file": ("flux", SCHNELL, write_diffusers_file, None),
    "flux-dev-bfl": ("flux", DEV, write_bfl, None),
    "flux-schnell-bfl-prefixed": ("flux", SCHNELL, write_original, None),
    "flux-dev-bfl-bf16": ("flux", DEV, write_bfl, torch.bfloat16),
    "flux-schnell-bfl-fp8": ("flux", SCHNELL, write_bfl, torch.float8_e4m3fn),
}


def make_peer(family, cfg, seed=0):
    return (peers.sd3_peer if family == "sd3" else peers.flux_peer)(**cfg, seed=seed)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_diffusers_for_every_layout(case, tmp_path):
    family, cfg, write, dtype = CASES[case]
    peer = make_peer(family, cfg)
    source = write(peer, tmp_path, dtype)
    model = load_transformer(source)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    assert model.config.family == family
    reference = peers.rounded(peer, dtype) if dtype is not None else peer
    err = peers.parity(model, reference)
    print(f"\n{case}: max abs err / max abs out = {err:.2e}")
    assert err <= TOL


def test_layout_and_config_source_are_recorded(tmp_path):
    peer = make_peer("sd3", SD3_ODD)
    model = load_transformer(write_diffusers_folder(peer, tmp_path, None))
    assert model.detected.layout == "diffusers" and model.detected.config_source == "config.json"
    assert (model.config.num_heads, model.config.head_dim) == (3, 32)
    assert model.source_files == [str(tmp_path / "folder/diffusion_pytorch_model.safetensors")]
    peer = make_peer("sd3", SD35M)
    model = load_transformer(write_original(peer, tmp_path, None))
    assert (model.detected.layout, model.detected.prefix) == ("original", "model.diffusion_model.")
    assert model.config.dual_attention_layers == (0, 1) and model.config.qk_norm


def test_load_casts_to_the_requested_dtype(tmp_path):
    peer = make_peer("flux", SCHNELL)
    model = load_transformer(write_bfl(peer, tmp_path, None), dtype=torch.bfloat16)
    assert {p.dtype for p in model.state_dict().values()} == {torch.bfloat16}


def test_loaded_for_inference_unless_a_trainer_asks(tmp_path):
    """requires_grad=False by default (no autograd graph in a plain call), True for trainers."""
    path = write_bfl(make_peer("flux", SCHNELL), tmp_path, None)
    assert not any(p.requires_grad for p in load_transformer(path).parameters())
    assert all(p.requires_grad for p in load_transformer(path, requires_grad=True).parameters())


def test_flux_with_other_head_dim_loads_with_axes_given(tmp_path):
    peer = peers.flux_peer(num_double=1, num_single=1, heads=2, head_dim=64, axes=(8, 28, 28))
    path = write_bfl(peer, tmp_path, None)
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_transformer(path)
    assert peers.parity(load_transformer(path, config={"axes_dim": (8, 28, 28)}), peer) <= TOL


def test_calibrated_ma_spec_is_attached(tmp_path, monkeypatch):
    peer = make_peer("sd3", SD3M)
    path = write_original(peer, tmp_path, None)
    spec = mmdit.MASpec(channels=(3, 5), block=1)
    seen = []
    monkeypatch.setattr(mmdit.ma, "spec_for_checkpoint", lambda p: seen.append(p) or spec)
    model = load_transformer(path)
    assert model.ma is spec and [[str(f) for f in files] for files in seen] == [[str(path)]]


# ---- the hub ------------------------------------------------------------------------------

@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_repo_loads_from_the_offline_cache(tmp_path, offline_cache):
    # a diffusers pipeline repo of which only transformer/ was downloaded (sharded, with index),
    # beside a VAE file that is never opened
    peer = make_peer("sd3", SD35M)
    folder = write_sharded(peer, tmp_path, None)
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    files["vae/diffusion_pytorch_model.safetensors"] = tmp_path / "junk.safetensors"
    peers.fake_hub_cache(offline_cache, "org/sd35-tiny", files,
                         not_downloaded=("text_encoder/model.safetensors", "sd35_tiny.safetensors"))
    model = load_transformer("org/sd35-tiny")
    assert peers.parity(model, peer) <= TOL
    assert model.detected.config_source == "config.json" and len(model.source_files) > 1
    # a single-file download from a repo that also has transformer/ (BFL style): the transformer
    # file is picked, ae.safetensors is not
    peer = make_peer("flux", DEV)
    bfl = write_bfl(peer, tmp_path, None)
    peers.fake_hub_cache(offline_cache, "org/flux-tiny", {"flux1-tiny.safetensors": bfl,
                                                          "ae.safetensors": tmp_path / "junk.safetensors"},
                         not_downloaded=("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"))
    assert peers.parity(load_transformer("org/flux-tiny"), peer) <= TOL
    assert peers.parity(load_transformer("org/flux-tiny/flux1-tiny.safetensors"), peer) <= TOL


def test_every_way_to_point_at_a_diffusers_checkpoint(tmp_path):
    peer = make_peer("flux", SCHNELL)
    folder = write_sharded(peer, tmp_path, None)
    index = folder / "transformer/diffusion_pytorch_model.safetensors.index.json"
    for source in (folder, folder / "transformer", index, str(index)):
        model = load_transformer(source)
        assert model.detected.config_source == "config.json"
        assert peers.parity(model, peer) <= TOL


def test_hub_repo_not_in_the_offline_cache_is_one_clear_error(offline_cache):
    with pytest.raises(CheckpointError, match=r"org/missing is not in the local Hugging Face cache.*"
                                              r"HF_HUB_OFFLINE=1 forbids downloading") as e:
        load_transformer("org/missing")
    assert e.value.__cause__ is None and "hf download org/missing" in str(e.value)


def test_hub_online_downloads_only_transformer_files(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub  # mmdit imports it where used; patch the module itself
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    peer = make_peer("flux", SCHNELL)
    folder = peers.save_diffusers_folder(peer, tmp_path / "snap", pipeline=True)
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None, token=None: [
        "model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "flux1-schnell.safetensors", "ae.safetensors"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(folder))
    assert peers.parity(load_transformer("org/flux-schnell-tiny", revision="v1", token="tok"), peer) <= TOL
    (repo, kw), = calls
    assert repo == "org/flux-schnell-tiny" and kw["revision"] == "v1" and kw["token"] == "tok"
    assert kw["allow_patterns"] == ["transformer/*.json", "transformer/*.safetensors"]
    # single-file repo: the one transformer file, not the VAE or text encoders
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None, token=None: [
        "flux1-dev.safetensors", "ae.safetensors", "text_encoders/clip_l.safetensors", "README.md"])
    assert hub._patterns("org/x", None, None) == ["flux1-dev.safetensors"]


# ---- strictness and user errors -----------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_original(tmp_path_factory):
    path = peers.save_original(make_peer("sd3", SD3M), tmp_path_factory.mktemp("strict") / "sd3.safetensors")
    return load_file(str(path))


def edited(sd, path, drop=(), add=None):
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update(add or {})
    save_file(sd, str(path))
    return path


def test_dropped_key_is_named(sd3_original, tmp_path):
    key = "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.bias"
    with pytest.raises(CheckpointError, match=rf"(?s)layout: original, prefix 'model.diffusion_model.'.*"
                                              rf"missing 1 key\(s\): {key} \(128,\)") as e:
        load_transformer(edited(sd3_original, tmp_path / "f.safetensors", drop=[key]))
    assert "unexpected" not in str(e.value)


def test_extra_key_is_named(sd3_original, tmp_path):
    extra = {"model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight": torch.zeros(2, 3),
             "model_ema.decay": torch.zeros(())}
    with pytest.raises(CheckpointError, match=r"unexpected 2 key\(s\): model.diffusion_model.joint_blocks.0"
                                              r".x_block.attn.extra.weight \(2, 3\), model_ema.decay \(\)"):
        load_transformer(edited(sd3_original, tmp_path / "f.safetensors", add=extra))


def test_wrong_shape_is_named(sd3_original, tmp_path):
    key = "model.diffusion_model.joint_blocks.0.context_block.attn.proj.weight"
    with pytest.raises(CheckpointError, match=rf"shape mismatch for {key}: model expects \(128, 128\), "
                                              r"checkpoint has \(128, 127\)"):
        load_transformer(edited(sd3_original, tmp_path / "f.safetensors", add={key: torch.zeros(128, 127)}))


def test_diffusers_errors_use_diffusers_names(tmp_path):
    sd = peers.diffusers_state(make_peer("flux", DEV))
    path = edited(sd, tmp_path / "f.safetensors", drop=["single_transformer_blocks.1.attn.to_k.bias"],
                  add={"transformer_blocks.0.attn.to_v.weight": torch.zeros(256, 255)})
    with pytest.raises(CheckpointError, match=r"layout: diffusers, flux") as e:
        load_transformer(path)
    msg = str(e.value)
    assert "missing 1 key(s): single_transformer_blocks.1.attn.to_k.bias (256,)" in msg
    assert "shape mismatch for transformer_blocks.0.attn.to_v.weight: model expects (256, 256), " \
           "checkpoint has (256, 255)" in msg


@pytest.mark.parametrize("what, make, pattern", [
    ("bad path", lambda d: d / "nope.safetensors", "does not exist"),
    ("not safetensors", lambda d: d / "model.ckpt", "not a .safetensors file"),
    ("corrupt file", lambda d: d / "bad.safetensors", "not a readable safetensors file"),
    ("a VAE", lambda d: d / "vae.safetensors", "not an SD3 / SD3.5 / FLUX.1 .*transformer.*looks like a VAE"),
    ("pipeline without transformer", lambda d: d / "pipe", "diffusers pipeline folder without a transformer/"),
])
def test_user_errors_are_one_clear_message(what, make, pattern, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\0" * 16)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)},
              str(tmp_path / "vae.safetensors"))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe/model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_transformer(make(tmp_path))
    assert e.value.__cause__ is None


# ---- mmdit inspect -------------------------------------------------------------------------

def test_cli_inspect_describes_a_checkpoint(tmp_path, capsys):
    path = peers.save_original(make_peer("sd3", SD35M), tmp_path / "sd35.safetensors", dtype=torch.float16)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert lines["layout"].strip() == "original (prefix 'model.diffusion_model.')"
    assert lines["family"].strip() == "SD3 / SD3.5 (MMDiT)"
    assert lines["preset"].strip() == "none (custom config)"
    assert "num_layers=3 num_heads=2 head_dim=64" in lines["config"]
    assert "qk_norm=True dual_attention_layers=(0, 1)" in lines["config"]
    assert lines["dtype"].strip().startswith("float16 (")
    model = load_transformer(path)
    n = sum(p.numel() for p in model.parameters())
    assert lines["parameters"].strip() == f"{n:,} (+ {model.pos_embed.numel():,} in the stored pos_embed table)"
    assert "text_encoders.clip_l (1 tensors)" in lines["also in file"]


def test_cli_inspect_bad_path_exits_2(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- files as people have them (renamed norms, index-less shards, quantized or LoRA files): what loads, what is named

def test_comfy_flux_norm_weight_variant_loads(tmp_path):
    peer = make_peer("flux", DEV)
    sd = {k.replace("_norm.scale", "_norm.weight"): v for k, v in peers.original_state(peer).items()}
    assert any(k.endswith("query_norm.weight") for k in sd)
    model = load_transformer(peers.save(sd, tmp_path / "comfy_flux.safetensors"))
    assert peers.parity(model, peer) <= TOL


def test_shards_without_an_index_load_or_name_what_is_missing(tmp_path):
    peer = make_peer("sd3", SD35M)
    folder = write_sharded(peer, tmp_path, None) / "transformer"
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert peers.parity(load_transformer(folder), peer) <= TOL
    with pytest.raises(CheckpointError, match=r"(?s)one shard of a multi-file set: point at the folder.*missing"):
        load_transformer(shards[0])
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard files are missing: \['{shards[1].name}'\]"):
        load_transformer(folder)
    # a BFL-named set beside a VAE file, no index
    peer = make_peer("flux", SCHNELL)
    sd = peers.original_state(peer, "")
    keys = sorted(sd)
    bfl = tmp_path / "bfl"
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        peers.save({k: sd[k] for k in part}, bfl / f"flux1-schnell-0000{i + 1}-of-00002.safetensors")
    peers.save({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, bfl / "ae.safetensors")
    assert peers.parity(load_transformer(bfl), peer) <= TOL


def _bnb_nf4(sd):  # bitsandbytes 4-bit: packed uint8 weights + quant-state tensors
    out = dict(sd)
    for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
        out[k] = torch.zeros(sd[k].numel() // 2, 1, dtype=torch.uint8)
        out[k + ".absmax"] = torch.zeros(4)
        out[k + ".quant_map"] = torch.zeros(16)
        out[k + ".quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
    return out


def _quanto(sd):
    out = dict(sd)
    for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
        out[k + "._data"] = out.pop(k).to(torch.int8)
        out[k + "._scale"] = torch.ones(1)
    return out


def _lora_residue(sd):
    return {**sd, "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 256),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(768, 4)}


REFUSED = {  # what: (make the file from a FLUX original-layout state dict, the message)
    "gguf": (None, r"is a GGUF file of version 0; mmdit reads versions 2 and 3"),  # GGUFs load: tests/test_gguf.py
    "bitsandbytes nf4": (_bnb_nf4, r"is a bitsandbytes NF4/FP4 quantized checkpoint .* not supported; use the bf16"),
    "optimum-quanto": (_quanto, r"is an optimum-quanto quantized checkpoint"),
    "chroma radiance": (lambda sd: {**sd, "nerf_blocks.0.norm.scale": torch.zeros(8)}, r"is Chroma1-Radiance"),
    "a lora": (lambda sd: {k: v for k, v in _lora_residue(sd).items() if "lora" in k},
               r"is a LoRA adapter .* not a model: load the base model and apply it with mmdit.apply_lora"),
    "lora residue": (_lora_residue, r"(?s)2 of its tensors are LoRA tensors.*unexpected 2 key"),
    "ema residue": (lambda sd: {**sd, "model_ema.decay": torch.zeros(()), "model_ema.num_updates": torch.zeros(())},
                    r"(?s)2 of its tensors are EMA residue.*unexpected 2 key"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_unsupported_files_are_named_and_inspect_fails_on_them(what, tmp_path, capsys):
    make, pattern = REFUSED[what]
    if make is None:
        path = tmp_path / "flux1-dev-Q4_K_S.gguf"
        path.write_bytes(b"GGUF" + b"\0" * 60)
    else:
        path = peers.save(make(peers.original_state(make_peer("flux", DEV), "")), tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_transformer(path)
    assert "download" not in str(e.value) and "truncated" not in str(e.value)
    assert len(str(e.value).splitlines()) <= 3
    assert cli_main(["inspect", str(path)]) == 2
    assert str(e.value).splitlines()[0] in capsys.readouterr().err
    if what == "gguf":  # the folder holding it, too
        with pytest.raises(CheckpointError, match=pattern):
            load_transformer(tmp_path)
