"""CLIP text encoder: parity with transformers from every layout, and clear loading errors."""
import json

import pytest
import torch

from helpers import rel_err, save_safetensors
from mmdit.encoders.clip import CLIP_PRESETS, CLIPConfig, CLIPTextEncoder, clip_config
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.encoders import load_text_encoder

transformers = pytest.importorskip("transformers")
TOL = 1e-4
BOS, EOS = 998, 999


def _hf(width, layers, heads, act, projection, eos=EOS, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act,
                                      max_position_embeddings=77, projection_dim=width - 32,
                                      bos_token_id=BOS, eos_token_id=eos, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def _ids(pad):
    ids = torch.randint(2, BOS, (3, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = BOS
    for row, n in enumerate((5, 30, 76)):  # EOS then pads (EOS again for CLIP-L, 0 = "!" for SD3's bigG)
        ids[row, n] = EOS
        ids[row, n + 1:] = pad
    return ids


def _check(ours, ref, ids):
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        pooled = getattr(ref, "text_model", ref)(ids).pooler_output  # WithProjection nests the tower
        o = ours(ids)
    errs = {"hidden": rel_err(o.hidden, r.last_hidden_state),
            "penultimate": rel_err(o.penultimate, r.hidden_states[-2]),
            "pooled": rel_err(o.pooled, pooled)}
    if hasattr(r, "text_embeds"):
        errs["projected"] = rel_err(o.projected, r.text_embeds)
    else:
        assert o.projected is None
    assert max(errs.values()) <= TOL, errs
    return errs


@pytest.fixture(scope="module")
def models():
    return {"l": _hf(768, 1, 12, "quick_gelu", projection=True),  # CLIP-L-like: width 768 -> quick_gelu inferred
            "g": _hf(128, 2, 2, "gelu", projection=True, seed=1),  # bigG-like: gelu, 64-wide heads
            "flux_l": _hf(128, 2, 2, "quick_gelu", projection=False, seed=2),  # FLUX: CLIPTextModel
            "legacy": _hf(128, 2, 2, "quick_gelu", projection=True, eos=2, seed=3)}  # eos id 2: argmax pooling


@pytest.mark.parametrize("name,pad", [("l", EOS), ("g", 0), ("flux_l", EOS), ("legacy", EOS), ("legacy", 0)])
def test_matches_transformers_from_save_pretrained(models, tmp_path, name, pad):
    models[name].save_pretrained(tmp_path / "text_encoder")
    ours = load_text_encoder(tmp_path / "text_encoder")
    assert ours.config.eos_token_id == models[name].config.eos_token_id
    _check(ours, models[name], _ids(pad))


def test_stability_all_in_one(models, tmp_path):
    """text_encoders.clip_{l,g}.transformer.text_model.* (+ t5, VAE, transformer keys) in one file."""
    sd = {}
    for kind, name in [("clip_l", "l"), ("clip_g", "g")]:
        for k, v in models[name].state_dict().items():
            sd[f"text_encoders.{kind}.transformer.{k}"] = v
    sd["text_encoders.t5xxl.transformer.shared.weight"] = torch.zeros(4, 4)
    sd["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(2, 2)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.") for k in sd)
    path = save_safetensors(sd, tmp_path / "sd3_medium_incl_clips.safetensors")
    for kind, name in [("clip_l", "l"), ("clip_g", "g")]:
        ours = load_text_encoder(path, kind=kind)
        assert ours.config.activation == ("quick_gelu" if name == "l" else "gelu")  # from the width alone
        assert ours.config.num_heads == models[name].config.num_attention_heads
        _check(ours, models[name], _ids(EOS if name == "l" else 0))
    with pytest.raises(CheckpointError, match="clip_l.*clip_g.*t5xxl.*pass kind"):
        load_text_encoder(path)


@pytest.mark.parametrize("nested", [False, True])
def test_standalone_file_both_key_styles(models, tmp_path, nested):
    """clip_g.safetensors with transformers-5 flattened keys, or the older text_model.* nesting."""
    sd = models["flux_l"].state_dict()  # CLIPTextModel in transformers 5: no text_model. prefix
    assert not any(k.startswith("text_model.") for k in sd)
    if nested:
        sd = {f"text_model.{k}": v for k, v in sd.items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files carry this buffer
        sd["vision_model.post_layernorm.weight"] = torch.ones(8)  # a full CLIPModel: the image tower is skipped
        sd["logit_scale"] = torch.tensor(2.0)
    path = save_safetensors(sd, tmp_path / "clip.safetensors")
    ours = load_text_encoder(path)
    assert ours.text_projection is None and ours.config.activation == "gelu"  # width 128: inferred as OpenCLIP
    ref = models["flux_l"]
    ref_gelu = _hf(128, 2, 2, "gelu", projection=False)
    ref_gelu.load_state_dict(ref.state_dict())
    _check(ours, ref_gelu, _ids(EOS))


def test_pipeline_folder_kind(models, tmp_path):
    root = tmp_path / "sd3"
    models["l"].save_pretrained(root / "text_encoder")
    models["g"].save_pretrained(root / "text_encoder_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert load_text_encoder(root, kind="clip_g").config.width == 128
    assert load_text_encoder(root, kind="clip_l").config.width == 768
    with pytest.raises(CheckpointError, match="pass kind"):
        load_text_encoder(root)
    with pytest.raises(CheckpointError, match="no 't5xxl'"):
        load_text_encoder(root, kind="t5xxl")


def test_dtypes_and_float8(models, tmp_path):
    sd = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in models["g"].state_dict().items()}
    path = save_safetensors(sd, tmp_path / "clip_g_fp8.safetensors")
    ours = load_text_encoder(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ours.parameters())
    w = ours.state_dict()["encoder.layers.1.mlp.fc2.weight"]
    assert torch.equal(w, sd["text_model.encoder.layers.1.mlp.fc2.weight"].float())
    bf = load_text_encoder(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert torch.isfinite(bf(_ids(0)).projected.float()).all()


def test_errors(models, tmp_path):
    sd = dict(models["g"].state_dict())
    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 key.*layers\.1\.self_attn\.k_proj\.bias") as e:
        load_text_encoder(save_safetensors(missing, tmp_path / "missing.safetensors"))
    assert "CLIP, transformers names" in str(e.value)
    wrong = {**sd, "text_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(3, 128)}
    shape = r"shape mismatch for encoder\.layers\.1\.mlp\.fc1\.weight.*\(256, 128\).*\(3, 128\)"
    with pytest.raises(CheckpointError, match=shape):
        load_text_encoder(save_safetensors(wrong, tmp_path / "wrong.safetensors"))
    extra = {**sd, "text_model.encoder.layers.1.surprise": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*surprise"):
        load_text_encoder(save_safetensors(extra, tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "nope.safetensors")
    (tmp_path / "clip.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_text_encoder(tmp_path / "clip.bin")
    (tmp_path / "fake.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_text_encoder(tmp_path / "fake.safetensors")
    with pytest.raises(CheckpointError, match="holds a CLIP text encoder, not 't5xxl'"):
        load_text_encoder(save_safetensors(sd, tmp_path / "ok.safetensors"), kind="t5xxl")
    with pytest.raises(CheckpointError, match="no CLIP or T5"):
        load_text_encoder(save_safetensors({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors"))


def test_presets_and_config_checks():
    assert clip_config("clip-l") == CLIPConfig()
    g = clip_config("clip-g")
    assert (g.width, g.num_layers, g.num_heads, g.mlp_dim) == (1280, 32, 20, 5120)
    assert (g.activation, g.projection_dim) == ("gelu", 1280)
    with torch.device("meta"):  # docs/architecture.md, parameter counts
        n_l = sum(p.numel() for p in CLIPTextEncoder(clip_config("clip-l", projection_dim=None)).parameters())
        n_g = sum(p.numel() for p in CLIPTextEncoder(CLIP_PRESETS["clip-g"]).parameters())
    assert (n_l, n_g) == (123_060_480, 694_659_840)
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        clip_config("clip-h")
    with pytest.raises(ValueError, match="not divisible"):
        CLIPConfig(width=100, num_heads=3)
