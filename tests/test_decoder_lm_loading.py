"""Decoder-LM loading from every layout: transformers 5 and 4.x folders (sharded), ComfyUI single
files (prefixes, vision tower / LM head / tokenizer blob beside, fp8, scaled fp8, pruned), pipeline
folders and ``mmdit.load_text_encoder``; strict errors."""
import json

import pytest
import torch

import peers_lm as P
from helpers import save_safetensors
from mmdit.encoders.decoder_lm import DECODER_LM_PRESETS, DecoderLM, DecoderLMConfig
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.decoder_lm import lm_config, load_decoder_lm
from mmdit.weights.encoders import load_text_encoder

transformers = pytest.importorskip("transformers")
CLASSES = {"mistral3": "Mistral3ForConditionalGeneration", "qwen3": "Qwen3ForCausalLM",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=P.KINDS)
def peer(request):
    return request.param, P.BUILD[request.param]()


def _same_weights(model: DecoderLM, peer, layers: int | None = None) -> None:
    want = P.lm_state_dict(peer)
    if layers is not None:
        want = {k: v for k, v in want.items()
                if k != "norm.weight" and (not k.startswith("layers.") or int(k.split(".")[1]) < layers)}
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def _tiny_config(peer) -> DecoderLMConfig:
    lm = P.language_model(peer).config
    head_dim = getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads
    return DecoderLMConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
                           num_kv_heads=1, head_dim=head_dim, rms_eps=lm.rms_norm_eps,
                           rope_theta=lm.rope_parameters["rope_theta"])


def test_transformers5_sharded_folder(peer, tmp_path):
    kind, model = peer
    model.save_pretrained(tmp_path / "te", max_shard_size="20KB")
    index = json.loads((tmp_path / "te" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _same_weights(load_decoder_lm(tmp_path / "te"), model)
    _same_weights(load_decoder_lm(tmp_path / "te" / "model.safetensors.index.json"), model)


def test_transformers4_folder(peer, tmp_path):
    """Legacy key names and config.json fields; transformers 5 reads the same folder to the same model."""
    kind, model = peer
    folder = tmp_path / "legacy"
    save_safetensors(P.legacy_state_dict(model, kind), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(P.legacy_config(model)))
    ours = load_decoder_lm(folder)
    _same_weights(ours, model)
    ref = getattr(transformers, CLASSES[kind]).from_pretrained(folder)
    assert torch.equal(P.language_model(ref).layers[1].mlp.up_proj.weight, ours.layers[1].mlp.up_proj.weight)
    assert ours.config.rope_theta == P.language_model(model).config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("prefix", ["model.", "", "text_encoders.qwen3_4b.transformer.model."])
def test_comfy_single_file(peer, tmp_path, prefix):
    """Language model + LM head + what ComfyUI keeps beside it; no config.json, so the preset
    values come from ``config=`` (these tiny shapes are no preset's)."""
    kind, model = peer
    sd = P.comfy_state_dict(model, kind, prefix)
    if prefix.startswith("text_encoders."):  # an all-in-one checkpoint: other components beside
        sd["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
    path = save_safetensors(sd, tmp_path / f"{kind}.safetensors")
    with pytest.raises(CheckpointError, match="match no preset; pass config="):
        load_decoder_lm(path)
    ours = load_decoder_lm(path, config=_tiny_config(model))
    _same_weights(ours, model)


def test_comfy_single_file_config_matches_transformers(peer, tmp_path):
    kind, model = peer
    model.save_pretrained(tmp_path / "hf")
    path = save_safetensors(P.comfy_state_dict(model, kind), tmp_path / "te.safetensors")
    assert load_decoder_lm(path, config=_tiny_config(model)).config == load_decoder_lm(tmp_path / "hf").config


def test_fp8_and_comfy_scaled_fp8(tmp_path):
    model = P.qwen2_5_vl()
    sd = P.comfy_state_dict(model, "qwen2_5_vl")
    cfg = _tiny_config(model)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dtype == torch.float32 else v) for k, v in sd.items()}
    ours = load_decoder_lm(save_safetensors(fp8, tmp_path / "fp8.safetensors"), config=cfg)
    assert torch.equal(ours.layers[0].self_attn.q_proj.bias, fp8["model.layers.0.self_attn.q_proj.bias"].float())
    scaled = dict(sd)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        w = sd[name + ".weight"]
        scale = w.abs().max() / 448
        scaled[name + ".weight"] = (w / scale).to(torch.float8_e4m3fn)
        scaled[name + ".weight_scale"] = scale.reshape(())
        scaled[name + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    ours = load_decoder_lm(save_safetensors(scaled, tmp_path / "scaled.safetensors"), config=cfg)
    name = "model.layers.0.mlp.down_proj"
    w, original = ours.layers[0].mlp.down_proj.weight, sd[name + ".weight"]
    assert torch.equal(w, scaled[name + ".weight"].float() * scaled[name + ".weight_scale"])
    assert (w - original).abs().max() <= 0.07 * original.abs().max()  # e4m3: 3 mantissa bits


def test_pruned_file_and_num_layers(tmp_path):
    """ComfyUI's FLUX.2 Mistral file keeps only the layers FLUX.2 reads and no final norm;
    num_layers= does the same to a full file (the rest is checked, not read)."""
    model = P.mistral3(layers=3)
    sd = P.comfy_state_dict(model, "mistral3")
    pruned = {k: v for k, v in sd.items() if not k.startswith(("model.layers.2.", "model.norm."))}
    ours = load_decoder_lm(save_safetensors(pruned, tmp_path / "pruned.safetensors"), config=_tiny_config(model))
    assert ours.config.num_layers == 2 and not ours.config.final_norm and ours.norm is None
    _same_weights(ours, model, layers=2)
    ids, mask = P.padded_batch([5, 2], 5, "left", vocab=P.VOCAB)
    ref = P.hidden_states(model, ids, mask)
    with torch.no_grad():
        assert torch.equal(ours.hidden_states(ids, mask, (2,))[0], ref[2])
    model.save_pretrained(tmp_path / "full")
    cut = load_decoder_lm(tmp_path / "full", num_layers=2)
    _same_weights(cut, model, layers=2)
    with pytest.raises(ValueError, match="num_layers must be in 1..3"):
        load_decoder_lm(tmp_path / "full", num_layers=4)
    broken = {k: v for k, v in sd.items() if k != "model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match="missing 1 key"):  # checked even though not read
        load_decoder_lm(save_safetensors(broken, tmp_path / "broken.safetensors"), config=_tiny_config(model),
                        num_layers=2)


def test_pipeline_folder_and_load_text_encoder(tmp_path):
    model = P.qwen3()
    model.save_pretrained(tmp_path / "klein" / "text_encoder")
    index = {"text_encoder": ["transformers", "Qwen3ForCausalLM"]}
    (tmp_path / "klein" / "model_index.json").write_text(json.dumps(index))
    _same_weights(load_decoder_lm(tmp_path / "klein"), model)
    via_public = load_text_encoder(tmp_path / "klein", dtype=torch.bfloat16)
    assert isinstance(via_public, DecoderLM) and via_public.embed_tokens.weight.dtype == torch.bfloat16
    assert isinstance(load_text_encoder(tmp_path / "klein" / "text_encoder"), DecoderLM)
    path = save_safetensors(P.comfy_state_dict(model, "qwen3"), tmp_path / "qwen_3_4b.safetensors")
    with pytest.raises(CheckpointError, match="match no preset"):  # a single file is recognised too
        load_text_encoder(path)


def test_config_from_shapes_of_real_files():
    """Without config.json: eps / RoPE base / head_dim from the preset with these shapes; the
    two that share shapes (Qwen3-8B, Qwen3-VL-8B) need config=."""
    def shapes(name, **cut):
        with torch.device("meta"):
            m = DecoderLM(DECODER_LM_PRESETS[name])
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    for name in ("mistral-small-3.1-24b", "qwen3-4b", "qwen2.5-vl-7b"):
        assert lm_config(shapes(name), None, None, "f") == DECODER_LM_PRESETS[name]
    pruned = {k: v for k, v in shapes("mistral-small-3.1-24b").items()
              if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= 30)}
    cfg = lm_config(pruned, None, None, "f")
    assert (cfg.num_layers, cfg.final_norm, cfg.rope_theta, cfg.rms_eps) == (30, False, 1e9, 1e-5)
    with pytest.raises(CheckpointError, match=r"fit the presets \['qwen3-8b', 'qwen3-vl-8b'\]"):
        lm_config(shapes("qwen3-8b"), None, None, "f")
    assert lm_config(shapes("qwen3-8b"), None, "qwen3-vl-8b", "f") == DECODER_LM_PRESETS["qwen3-vl-8b"]
    with pytest.raises(ValueError, match="unknown decoder LM preset"):
        lm_config(shapes("qwen3-8b"), None, "qwen3-9b", "f")


def test_errors(tmp_path):
    model = P.mistral3(layers=2)
    cfg = _tiny_config(model)
    sd = P.comfy_state_dict(model, "mistral3")
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.o_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 key.*layers\.1\.self_attn\.o_proj\.weight") as e:
        load_decoder_lm(save_safetensors(missing, tmp_path / "missing.safetensors"), config=cfg)
    assert "decoder LM, prefix 'model.'" in str(e.value)
    extra = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*rotary_emb\.inv_freq"):
        load_decoder_lm(save_safetensors(extra, tmp_path / "extra.safetensors"), config=cfg)
    wrong = {**sd, "model.layers.1.mlp.down_proj.weight": torch.zeros(32, 63)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for layers\.1\.mlp\.down_proj\.weight"):
        load_decoder_lm(save_safetensors(wrong, tmp_path / "wrong.safetensors"), config=cfg)
    two = {**sd, **{"text_encoders.b." + k: v for k, v in sd.items()}}
    with pytest.raises(CheckpointError, match="several language models"):
        load_decoder_lm(save_safetensors(two, tmp_path / "two.safetensors"), config=cfg)
    t5 = save_safetensors({"encoder.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="holds no decoder language model"):
        load_decoder_lm(t5)
    native = save_safetensors({"tok_embeddings.weight": torch.zeros(4, 4), "layers.0.attention.wq.weight":
                               torch.zeros(4, 4)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match="Mistral's own layout"):
        load_decoder_lm(native)
    model.save_pretrained(tmp_path / "yarn")
    cj = json.loads((tmp_path / "yarn" / "config.json").read_text())
    cj["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e9, "factor": 4.0}
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(cj))
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn' is not supported"):
        load_decoder_lm(tmp_path / "yarn")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_decoder_lm(tmp_path / "nothing.safetensors")
