"""T5 v1.1 encoder: parity with transformers' T5EncoderModel from every layout, fp16, errors."""
import json

import pytest
import torch

from helpers import rel_err, save_safetensors
from mmdit.encoders.t5 import T5_PRESETS, T5Config, T5Encoder, relative_position_bucket, t5_config
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.encoders import load_text_encoder

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=6,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                relative_attention_max_distance=128)  # heads*d_kv = 96 != d_model, as in XXL
    return transformers.T5EncoderModel(cfg).eval()


def _ids(L=160):  # longer than max_distance: exercises the log-spaced and the last bucket
    return torch.randint(0, 300, (2, L), generator=torch.Generator().manual_seed(1))


def _check(ours, ref, ids=None):
    ids = _ids() if ids is None else ids
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).last_hidden_state)
    assert err <= TOL, err
    return err


def test_sharded_folder(ref, tmp_path):
    ref.save_pretrained(tmp_path / "text_encoder_3", max_shard_size="40KB")
    index = json.loads((tmp_path / "text_encoder_3" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = load_text_encoder(tmp_path / "text_encoder_3")
    assert (ours.config.num_heads, ours.config.d_kv, ours.config.num_layers) == (6, 16, 3)
    _check(ours, ref)
    _check(load_text_encoder(tmp_path / "text_encoder_3" / "model.safetensors.index.json"), ref)  # the index itself


def test_pipeline_folder(ref, tmp_path):
    ref.save_pretrained(tmp_path / "flux" / "text_encoder_2")
    (tmp_path / "flux" / "model_index.json").write_text("{}")
    _check(load_text_encoder(tmp_path / "flux", kind="t5xxl"), ref)


def test_all_in_one_with_embed_tokens_only(ref, tmp_path):
    """Stability prefix; the embedding stored as encoder.embed_tokens (tied to shared) instead."""
    sd = {f"text_encoders.t5xxl.transformer.{k}": v for k, v in ref.state_dict().items() if k != "shared.weight"}
    assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" in sd
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    path = save_safetensors(sd, tmp_path / "sd3.5_large.safetensors")
    ours = load_text_encoder(path, kind="t5xxl")
    assert ours.config.max_distance == 128  # not in the file: the T5 default
    _check(ours, ref)


def test_standalone_file_with_both_embeddings(ref, tmp_path):
    sd = dict(ref.state_dict())
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    _check(load_text_encoder(save_safetensors(sd, tmp_path / "t5xxl_fp16.safetensors")), ref)


def test_float8_file_upcasts(ref, tmp_path):
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in ref.state_dict().items()}
    ours = load_text_encoder(save_safetensors(sd, tmp_path / "t5xxl_fp8_e4m3fn.safetensors"), dtype=torch.float32)
    assert torch.equal(ours.shared.weight, sd["shared.weight"].float())


def test_fp16_keeps_wo_fp32_like_transformers(ref, tmp_path):
    ref.save_pretrained(tmp_path / "t5")
    ours = load_text_encoder(tmp_path / "t5", dtype=torch.float16)
    wo = ours.encoder["block"][1].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32 and ours.shared.weight.dtype == torch.float16
    assert torch.equal(wo, ref.encoder.block[1].layer[1].DenseReluDense.wo.weight)  # read in fp32, not via fp16
    hf16 = transformers.T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=torch.float16).eval()
    assert hf16.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = _ids(40)
    with torch.no_grad():
        out16, ref16, ref32 = ours(ids), hf16(ids).last_hidden_state, ref(ids).last_hidden_state
    assert out16.dtype == ref16.dtype == torch.float16
    assert rel_err(out16, ref16) <= 2e-3 and rel_err(out16, ref32) <= 2e-2


@pytest.mark.parametrize("wo_fp32", [False, True])
def test_fp16_activations_stay_finite(wo_fp32):
    """Pure fp16: the clamp catches the overflow; with wo in fp32 the residual is promoted instead."""
    cfg = T5Config(vocab_size=10, d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=8)
    model = T5Encoder(cfg).half()
    if wo_fp32:
        model.keep_wo_fp32()
    wo = model.encoder["block"][0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if wo_fp32 else torch.float16)
    with torch.no_grad():
        model.encoder["block"][0].layer[1].DenseReluDense.wo.weight.fill_(60000.0)  # overflows fp16
        model.encoder["block"][0].layer[1].DenseReluDense.wi_0.weight.fill_(10.0)
        model.encoder["block"][0].layer[1].DenseReluDense.wi_1.weight.fill_(10.0)
        out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-300, 301)[None, :]
    for buckets, dist in [(32, 128), (32, 20), (16, 64)]:
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=True, num_buckets=buckets, max_distance=dist)
        assert torch.equal(relative_position_bucket(rel, buckets, dist), ref)


def test_errors(ref, tmp_path):
    sd = dict(ref.state_dict())
    missing = {k: v for k, v in sd.items() if k != "encoder.block.2.layer.1.DenseReluDense.wo.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 key.*block\.2\.layer\.1\.DenseReluDense\.wo\.weight") as e:
        load_text_encoder(save_safetensors(missing, tmp_path / "missing.safetensors"))
    assert "T5, transformers names" in str(e.value)
    wrong = {**sd, "encoder.block.1.layer.0.SelfAttention.o.weight": torch.zeros(64, 95)}
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.block\.1\.layer\.0\.SelfAttention\.o\."):
        load_text_encoder(save_safetensors(wrong, tmp_path / "wrong.safetensors"))
    nobias = {k: v for k, v in sd.items() if "relative_attention_bias" not in k}
    with pytest.raises(CheckpointError, match="missing.*relative_attention_bias"):
        load_text_encoder(save_safetensors(nobias, tmp_path / "nobias.safetensors"))
    relu = {k.replace("wi_0", "wi"): v for k, v in sd.items() if "wi_1" not in k}
    with pytest.raises(CheckpointError, match="non-gated"):
        load_text_encoder(save_safetensors(relu, tmp_path / "t5_base.safetensors"))
    scaled = {**sd, "scaled_fp8": torch.zeros(0)}
    with pytest.raises(CheckpointError, match="scaled fp8"):
        load_text_encoder(save_safetensors(scaled, tmp_path / "t5xxl_fp8_scaled.safetensors"))
    with pytest.raises(CheckpointError, match="holds a T5 text encoder, not 'clip_l'"):
        load_text_encoder(save_safetensors(sd, tmp_path / "ok.safetensors"), kind="clip_l")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_text_encoder(tmp_path / "t5xxl_missing.safetensors")
    (tmp_path / "t5.ckpt").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        load_text_encoder(tmp_path / "t5.ckpt")


def test_presets():
    xxl = t5_config("t5-xxl")
    assert xxl == T5_PRESETS["t5-xxl"]
    assert (xxl.d_model, xxl.num_layers, xxl.num_heads, xxl.d_kv, xxl.d_ff) == (4096, 24, 64, 64, 10240)
    with torch.device("meta"):  # docs/architecture.md, parameter counts
        assert sum(p.numel() for p in T5Encoder(xxl).parameters()) == 4_762_310_656
    with pytest.raises(ValueError, match="unknown T5 preset"):
        t5_config("t5-small")
