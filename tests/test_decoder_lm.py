"""Decoder-LM text encoder: parity with the four transformers classes the pipelines load
(Mistral3ForConditionalGeneration, Qwen3ForCausalLM, Qwen2_5_VLForConditionalGeneration and
Qwen3VLForConditionalGeneration, text only), padded batches both ways, bf16, presets, one graph."""
import dataclasses

import pytest
import torch

import peers_lm as P
from helpers import rel_err
from mmdit.encoders.decoder_lm import DECODER_LM_PRESETS, DecoderLM, DecoderLMConfig, decoder_lm_config
from mmdit.weights.decoder_lm import load_decoder_lm

transformers = pytest.importorskip("transformers")
TOL = 1e-5  # fp32, relative to the reference's max |value|
BF16_TOL = 0.0  # bf16: same ops in the same order as transformers (measured: bit-identical on the CPU)
CLASSES = {"mistral3": "Mistral3ForConditionalGeneration", "qwen3": "Qwen3ForCausalLM",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=P.KINDS)
def pair(request, tmp_path_factory):
    """(kind, transformers peer, its save folder, ours loaded from that folder)."""
    peer = P.BUILD[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    peer.save_pretrained(folder)
    return request.param, peer, folder, load_decoder_lm(folder)


def _batches():
    yield "left", *P.padded_batch([9, 4, 12, 1], 12, "left")
    yield "right", *P.padded_batch([9, 4, 12, 1], 12, "right")
    yield "none", P.padded_batch([12, 12], 12, "right")[0], None


def test_config_read_from_the_folder(pair):
    kind, peer, _, ours = pair
    lm = P.language_model(peer).config
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        lm.num_hidden_layers, lm.hidden_size, lm.num_attention_heads, lm.num_key_value_heads,
        getattr(lm, "head_dim", None) or lm.hidden_size // lm.num_attention_heads)
    assert cfg.rope_theta == lm.rope_parameters["rope_theta"] and cfg.rms_eps == lm.rms_norm_eps
    assert cfg.qkv_bias == (kind == "qwen2_5_vl") and cfg.qk_norm == (kind in ("qwen3", "qwen3_vl"))


def test_every_hidden_state_matches_transformers(pair):
    """hidden_states[0..n] (pre-norm), last_hidden_state (post-norm) and the pre-norm last state
    the Qwen-Image 2.1 pipeline hooks out; pad positions included (FLUX.2's DiT reads them)."""
    kind, peer, _, ours = pair
    n = ours.config.num_layers
    for side, ids, mask in _batches():
        ref = P.hidden_states(peer, ids, mask)
        with torch.no_grad():
            got = ours.hidden_states(ids, mask, range(n + 1))
            last = ours(ids, mask)
        for k in range(n):  # transformers' entry n is post-norm (tied to last_hidden_state in v5)
            assert rel_err(got[k], ref[k]) <= TOL, (kind, side, k, rel_err(got[k], ref[k]))
        assert rel_err(last, ref[n]) <= TOL, (kind, side, rel_err(last, ref[n]))
        assert rel_err(got[n], P.pre_norm_last(peer, ids, mask)) <= TOL


def test_left_pad_rows_are_zero_attention_as_transformers_sdpa(pair):
    """A fully masked query row (left padding) gets attention output 0 (sdpa's behaviour), so its
    first-layer state is embedding + MLP(embedding) -- not a uniform average (eager's)."""
    kind, peer, _, ours = pair
    ids, mask = P.padded_batch([3], 6, "left")
    with torch.no_grad():
        emb, h1 = ours.hidden_states(ids, mask, (0, 1))
        layer = ours.layers[0]
        expected = emb + layer.mlp(layer.post_attention_layernorm(emb))
    assert torch.equal(h1[0, :3], expected[0, :3])
    assert rel_err(h1, P.hidden_states(peer, ids, mask)[1]) <= TOL


def test_bf16_matches_transformers_bf16(pair):
    kind, peer, folder, _ = pair
    ref_model = getattr(transformers, CLASSES[kind]).from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = load_decoder_lm(folder, dtype=torch.bfloat16)
    n = ours.config.num_layers
    for side, ids, mask in _batches():
        ref = P.hidden_states(ref_model, ids, mask)
        with torch.no_grad():
            got = ours.hidden_states(ids, mask, range(n))
            last = ours(ids, mask)
        assert last.dtype == torch.bfloat16
        for k in range(n):
            assert rel_err(got[k], ref[k]) <= BF16_TOL, (kind, side, k)
        assert rel_err(last, ref[n]) <= BF16_TOL


def test_layers_after_the_last_requested_are_not_run(pair):
    _, _, _, ours = pair
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(ours.layers)]
    try:
        ids, mask = P.padded_batch([5, 3], 5, "left")
        with torch.no_grad():
            ours.hidden_states(ids, mask, (1, 2))
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]


def test_hidden_state_indices_are_checked():
    model = DecoderLM(DecoderLMConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                      num_kv_heads=1, head_dim=4))
    ids = torch.tensor([[1, 2, 3]])
    assert len(model.hidden_states(ids, None, (0, 2, -1))) == 3
    for bad in [(3,), (-2,), ()]:
        with pytest.raises(ValueError, match="hidden-state indices"):
            model.hidden_states(ids, None, bad)
    no_norm = DecoderLM(dataclasses.replace(model.config, final_norm=False))
    assert no_norm.norm is None
    with pytest.raises(ValueError, match="without its final norm"):
        no_norm(ids)


@pytest.mark.parametrize("masked", [False, True])
def test_one_graph(masked):
    cfg = DecoderLMConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, qk_norm=True, qkv_bias=True)
    model = DecoderLM(cfg).eval()
    ids, mask = P.padded_batch([6, 2], 6, "left", vocab=32)
    explained = torch._dynamo.explain(model.hidden_states)(ids, mask if masked else None, (1, 2))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def _hf_language_model(name: str) -> torch.nn.Module:
    """transformers' text model with the real sizes, on meta (parameter counts only)."""
    p = DECODER_LM_PRESETS[name]
    common = dict(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                  num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                  num_key_value_heads=p.num_kv_heads, head_dim=p.head_dim)
    with torch.device("meta"):
        if name.startswith("mistral"):
            return transformers.MistralModel(transformers.MistralConfig(**common, sliding_window=None))
        if name == "qwen2.5-vl-7b":
            cfg = transformers.Qwen2_5_VLTextConfig(**{k: v for k, v in common.items() if k != "head_dim"})
            return transformers.Qwen2_5_VLTextModel(cfg)
        if name == "qwen3-vl-8b":
            return transformers.Qwen3VLTextModel(transformers.Qwen3VLTextConfig(**common))
        return transformers.Qwen3Model(transformers.Qwen3Config(**common))


@pytest.mark.parametrize("name", sorted(DECODER_LM_PRESETS))
def test_presets_have_the_language_models_sizes(name):
    with torch.device("meta"):
        ours = DecoderLM(decoder_lm_config(name))
    hf = _hf_language_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    counts = {"qwen2.5-vl-7b": 7_070_619_136, "qwen3-vl-8b": 7_568_405_504}  # research notes, LM without head
    if name in counts:
        assert sum(p.numel() for p in ours.parameters()) == counts[name]
    with pytest.raises(ValueError, match="unknown decoder LM preset"):
        decoder_lm_config("llama-7b")
