"""Prompt embeddings equal to the diffusers pipelines' own encode functions, on tiny random LMs
and tiny tokenizers that carry the real chat templates (no transformers at run time on our side):

* FLUX.2 [dev]   ``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` (31-layer Mistral3: states 10/20/30)
* FLUX.2 [klein] ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` (28-layer Qwen3: states 9/18/27)
* Qwen-Image     ``QwenImagePipeline.encode_prompt`` (Qwen2.5-VL)
* Qwen-Image 2.1 ``QwenImage21Pipeline.encode_prompt``, text only (Qwen3-VL), with a text-only
  stand-in for Qwen3VLProcessor (the real one needs torchvision; see peers_lm.TextOnlyQwen3VLProcessor).
"""
import json

import pytest
import torch

import peers_lm as P
from helpers import corpus, rel_err, save_safetensors
from mmdit.encoders.chat_tokenizer import load_chat_tokenizer
from mmdit.encoders.prompts import MISTRAL_SYSTEM, PROMPT_FORMATS, LMText, load_lm_text
from mmdit.encoders.tokenizers import TokenizerError
from mmdit.weights.decoder_lm import load_decoder_lm

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
TOL = 1e-5
PROMPTS = [
    "a photo of a cat",
    "",
    "a red dog riding a horse on mars, highly detailed, " * 3,
    "[IMG] tokens <|im_start|> and [INST] inside, ü 東京 🙂",
    "  spaces  \n\n newline\tand tab ",
    "a " * 1200,  # past FLUX.2's 512 tokens and Qwen-Image's 1024 + 34
]


def _pipeline_folder(root, peer, tok, tokenizer_dir="tokenizer"):
    peer.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / tokenizer_dir)
    (root / "model_index.json").write_text(json.dumps({"text_encoder": ["transformers", type(peer).__name__]}))
    return root


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {"qwen": P.write_qwen_tokenizer(root / "qwen", P.QWEN3_TEMPLATE),
            "mistral": P.write_mistral_tokenizer(root / "mistral", corpus() + [MISTRAL_SYSTEM] * 3),
            "root": root}


@pytest.fixture(scope="module")
def dev(toks, tmp_path_factory):
    peer = P.mistral3(vocab=len(toks["mistral"]), layers=31)
    return peer, toks["mistral"], _pipeline_folder(tmp_path_factory.mktemp("dev"), peer, toks["mistral"])


@pytest.fixture(scope="module")
def klein(toks, tmp_path_factory):
    peer = P.qwen3(vocab=len(toks["qwen"]), layers=28)
    return peer, toks["qwen"], _pipeline_folder(tmp_path_factory.mktemp("klein"), peer, toks["qwen"])


def test_tokenizer_matches_transformers(toks):
    """Our tokenizers.json reading + truncation/padding vs transformers' tokenizer calls."""
    texts = PROMPTS + corpus(60, seed=5)
    for name in ("qwen", "mistral"):
        ref, ours = toks[name], load_chat_tokenizer(toks["root"] / name)
        for kw in [dict(padding="max_length", truncation=True, max_length=40, padding_side="left"),
                   dict(padding="max_length", truncation=True, max_length=512, padding_side="right"),
                   dict(padding=True, truncation=True, max_length=1058, padding_side="right"),
                   dict(padding=True, padding_side="left")]:
            want = ref(texts, return_tensors="pt", **kw)
            ids, mask = ours(texts, max_length=kw.get("max_length"), pad_to_max=kw["padding"] == "max_length",
                             side=kw["padding_side"])
            assert torch.equal(ids, want.input_ids) and torch.equal(mask, want.attention_mask), (name, kw)


def test_templates_are_the_chat_templates(toks):
    """Our rendered templates = the real chat templates rendered by transformers."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    mistral, qwen = toks["mistral"], toks["qwen"]
    for p in PROMPTS[:5]:
        rendered = mistral.apply_chat_template(format_input([p]), tokenize=False)[0]
        assert PROMPT_FORMATS["flux.2-dev"].text(p) == rendered
        rendered = qwen.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
        assert PROMPT_FORMATS["flux.2-klein"].text(p) == rendered
    system = [{"role": "system", "content": [{"type": "text", "text": "Comprehend and analyze the provided prompt."}]}]
    assert P.TextOnlyQwen3VLProcessor(qwen).apply_chat_template(system) == PROMPT_FORMATS["qwen-image-2.1"].drop
    text = LMText(load_chat_tokenizer(toks["root"] / "qwen"), None, PROMPT_FORMATS["qwen-image-2.1"])
    assert text.drop == 14  # as with the real Qwen vocabulary (research notes)
    prefix = PROMPT_FORMATS["qwen-image"].text("").split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
    assert len(qwen(prefix).input_ids) == PROMPT_FORMATS["qwen-image"].drop == 34


def test_flux2_dev(dev):
    from diffusers import Flux2Pipeline

    peer, tok, folder = dev
    text = load_lm_text("flux.2-dev", folder)
    assert text.encoder.config.num_layers == 30 and text.encoder.norm is None  # only what 10/20/30 need
    for n in (512, 40):
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(text_encoder=peer, tokenizer=tok, prompt=PROMPTS,
                                                               max_sequence_length=n)
        got = text(PROMPTS, n)
        assert set(got) == {"context"} and got["context"].shape == ref.shape == (len(PROMPTS), n, 3 * 32)
        assert rel_err(got["context"], ref) <= TOL, n
    ids, mask = text.tokenize(PROMPTS, 512)
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # left padding
    assert (ids[:, -1] == tok.convert_tokens_to_ids("[/INST]")).sum() == len(PROMPTS) - 1  # the long one is cut
    assert (ids == tok.convert_tokens_to_ids("[IMG]")).sum() == 0  # removed from prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flux2_klein(klein, dtype):
    from diffusers import Flux2KleinPipeline

    peer, tok, folder = klein
    if dtype != torch.float32:
        peer = transformers.Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=dtype)
    text = load_lm_text("flux.2-klein", folder, dtype=dtype)
    assert text.encoder.config.num_layers == 27
    ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder=peer, tokenizer=tok, prompt=PROMPTS,
                                                      max_sequence_length=512)
    got = text(PROMPTS)  # 512 by default
    assert got["context"].dtype == dtype and got["context"].shape == ref.shape == (len(PROMPTS), 512, 3 * 32)
    assert rel_err(got["context"], ref) <= (TOL if dtype == torch.float32 else 0.0)
    negative = text([""])["context"]  # CFG's negative prompt goes through the same template
    assert rel_err(negative, Flux2KleinPipeline._get_qwen3_prompt_embeds(peer, tok, [""])) <= TOL


def test_qwen_image(toks, tmp_path):
    from diffusers import QwenImagePipeline

    tok = toks["qwen"]
    peer = P.qwen2_5_vl(vocab=len(tok))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=peer, tokenizer=tok, transformer=None)
    text = load_lm_text("qwen-image", _pipeline_folder(tmp_path, peer, tok))
    for prompts, n in [(PROMPTS, 512), (PROMPTS[:2], 5), (["a photo of a cat"], 512)]:
        ref, ref_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=n)
        got = text(prompts, n)
        assert got["context"].shape == ref.shape and rel_err(got["context"], ref) <= TOL
        want_mask = torch.ones(ref.shape[:2], dtype=torch.long) if ref_mask is None else ref_mask
        assert torch.equal(got["context_mask"], want_mask)
    assert text(PROMPTS)["context"].shape[1] == 512  # the long prompt: cut at 1024 + 34 tokens, then at 512


def test_qwen_image_2_1_text_only(toks, tmp_path):
    from diffusers import QwenImage21Pipeline

    tok = toks["qwen"]
    peer = P.qwen3_vl(vocab=len(tok))
    processor = P.TextOnlyQwen3VLProcessor(tok)
    pipe = QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=peer, processor=processor, transformer=None)
    text = load_lm_text("qwen-image-2.1", _pipeline_folder(tmp_path, peer, tok, "processor"))  # as the hub repo
    assert text.drop == pipe._drop_idx == 14
    for prompts in (PROMPTS, ["", "a photo of a cat"], ["a photo of a cat"]):
        ref, ref_mask, image_pad = pipe.encode_prompt(prompts, device="cpu")
        got = text(prompts)
        assert not image_pad.any()
        assert got["context"].shape == ref.shape and rel_err(got["context"], ref) <= TOL
        want_mask = torch.ones(ref.shape[:2], dtype=torch.long) if ref_mask is None else ref_mask
        assert torch.equal(got["context_mask"], want_mask)


def test_tekken(toks, tmp_path):
    """tekken.json (and ComfyUI's tekken_model tensor) give transformers' MistralConverter ids; a
    ComfyUI Mistral file alone encodes FLUX.2 [dev] prompts as the pipeline with that tokenizer."""
    from diffusers import Flux2Pipeline
    from transformers.integrations.mistral.tokenizer import MistralConverter

    (tmp_path / "tk").mkdir()
    P.write_tekken(tmp_path / "tk" / "tekken.json", toks["mistral"])
    ref_backend = MistralConverter(str(tmp_path / "tk" / "tekken.json")).converted()
    ours = load_chat_tokenizer(tmp_path / "tk")
    for t in PROMPTS + corpus(100, seed=7) + [PROMPT_FORMATS["flux.2-dev"].text("x [INST] y")]:
        assert ours.encode(t) == ref_backend.encode(t, add_special_tokens=False).ids, t
    assert ours.pad_id == 11
    peer = P.mistral3(vocab=ref_backend.get_vocab_size(), layers=31, seed=3)
    sd = P.comfy_state_dict(peer, "mistral3")
    sd["tekken_model"] = torch.frombuffer(bytearray((tmp_path / "tk" / "tekken.json").read_bytes()), dtype=torch.uint8)
    path = save_safetensors(sd, tmp_path / "mistral_3_small_flux2.safetensors")
    peer.save_pretrained(tmp_path / "hf")
    cfg = load_decoder_lm(tmp_path / "hf").config  # the tiny shapes are no preset's
    encoder = load_decoder_lm(path, config=cfg, num_layers=30)
    text = LMText(load_chat_tokenizer(path), encoder, PROMPT_FORMATS["flux.2-dev"])
    ref_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=ref_backend, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                                   chat_template=P.MISTRAL_TEMPLATE)
    ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(text_encoder=peer, tokenizer=ref_tok, prompt=PROMPTS[:4],
                                                           max_sequence_length=64)
    assert rel_err(text(PROMPTS[:4], 64)["context"], ref) <= TOL
    with pytest.raises(TokenizerError, match="carries no tokenizer"):
        load_chat_tokenizer(save_safetensors({"a": torch.zeros(1)}, tmp_path / "qwen.safetensors"))


def test_errors(toks, tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        load_lm_text("flux.3", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lm_text("flux.2-klein-4b", tmp_path / "missing")
    assert PROMPT_FORMATS["flux.2-klein-9b"] is PROMPT_FORMATS["flux.2-klein"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer.json or tekken.json"):
        load_chat_tokenizer(tmp_path / "empty")
    (tmp_path / "nopad").mkdir()
    toks["qwen"].backend_tokenizer.save(str(tmp_path / "nopad" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="names no pad_token"):
        load_chat_tokenizer(tmp_path / "nopad")
    with pytest.raises(ValueError, match="exactly one"):
        PROMPT_FORMATS["flux.2-dev"].__class__(template="no slot", side="left", length=1)
