"""Our tokenizers give exactly transformers' ids (what the SD3 / FLUX diffusers pipelines feed).

Vocab files can't be downloaded here, so small ones are trained in the hub's formats:
a byte-level BPE laid out like OpenAI's vocab.json / merges.txt (both pad conventions),
and a unigram spiece.model with T5's special ids.
"""
import pytest
import torch

from helpers import write_clip_tokenizer, write_t5_tokenizer
from mmdit.encoders.tokenizers import PromptTokenizer, TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "",
    "  Hello,   WORLD!!  ",
    "Ünïcödé café naïve résumé — “quotes” and 'apostrophes' don't we're",
    "東京 日本語 🙂🐱 !",
    "wow! so! many!!! bangs! ! !",
    "<|startoftext|> x <|endoftext|> y <|STARTOFTEXT|>",
    "tab\tnew\nline\r\nend",
    "12345 3.14159, 1,000,000",
    "ｆｕｌｌ　ｗｉｄｔｈ ①②",
    "an astronaut riding a horse on mars, highly detailed, " * 12,  # > 77 tokens
    "a </s> b <extra_id_0> c <pad> d <unk> e",
    "   ",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {"clip_eos": write_clip_tokenizer(root / "clip_l"),
           "clip_bang": write_clip_tokenizer(root / "clip_g", pad="!"),  # SD3's tokenizer_2
           "t5_spiece": write_t5_tokenizer(root / "t5")}
    # transformers 5 saves a single tokenizer.json (+ config): both loaders must accept that too
    for name, cls in [("clip_bang", transformers.CLIPTokenizer), ("t5_spiece", transformers.T5TokenizerFast)]:
        json_only = root / f"{name}_json"
        cls.from_pretrained(out[name]).save_pretrained(json_only)
        assert (json_only / "tokenizer.json").exists() and not (json_only / "vocab.json").exists()
        assert not (json_only / "spiece.model").exists()
        out[f"{name}_json"] = json_only
    return out


def _reference(folder, cls, prompts, n):
    tok = cls.from_pretrained(folder)
    return tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("name", ["clip_eos", "clip_bang", "clip_bang_json"])
@pytest.mark.parametrize("n", [77, 12])
def test_clip_ids_match_transformers(folders, name, n):
    ours = load_tokenizer(folders[name])
    ref = _reference(folders[name], transformers.CLIPTokenizer, PROMPTS, n)
    got = ours(PROMPTS, n)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), n)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not torch.equal(a, b)]
    assert not bad, f"{name}: ids differ from transformers for {bad}"


@pytest.mark.parametrize("name", ["t5_spiece", "t5_spiece_json"])
@pytest.mark.parametrize("n", [64, 9])
def test_t5_ids_match_transformers(folders, name, n):
    ours = load_tokenizer(folders[name])
    ref = _reference(folders[name], transformers.T5TokenizerFast, PROMPTS, n)
    got = ours(PROMPTS, n)
    bad = [p for p, a, b in zip(PROMPTS, got, ref) if not torch.equal(a, b)]
    assert not bad, f"{name}: ids differ from transformers for {bad}"


def test_t5_matches_sentencepiece_itself(folders):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folders["t5_spiece"] / "spiece.model"))
    ours = load_tokenizer(folders["t5_spiece"])
    for p in PROMPTS:
        if "<" not in p:  # sentencepiece knows no added special tokens
            assert ours.encode(p) == sp.encode(p), p


def test_clip_template_padding_and_truncation(folders):
    l, g = load_tokenizer(folders["clip_eos"]), load_tokenizer(folders["clip_bang"])
    assert (l.pad, g.pad) == (l.eos, 0) and l.bos == g.bos and l.max_length == 77
    empty = l([""], 77)[0].tolist()
    assert empty == [l.bos] + [l.eos] * 76
    assert g("")[0].tolist() == [g.bos, g.eos] + [0] * 75  # default length: model_max_length
    long = l([PROMPTS[10]], 77)[0]
    assert long[0] == l.bos and long[-1] == l.eos and (long[1:-1] != l.eos).all()  # truncated, EOS kept
    # with pad "!" a literal "!" is the pad id, as in transformers (diffusers issue #4153)
    assert 0 in g.encode("wow!") and 0 not in l.encode("wow!")


def test_t5_template(folders):
    t5 = load_tokenizer(folders["t5_spiece"])
    assert (t5.bos, t5.eos, t5.pad, t5.max_length) == (None, 1, 0, 512)
    assert t5([""], 5)[0].tolist() == [1, 0, 0, 0, 0]
    ids = t5(["photo"] * 2 + [PROMPTS[10]], 16)
    assert ids.shape == (3, 16) and ids[2, -1] == 1 and (ids[2, :-1] != 0).all()  # truncated, </s> kept


def test_single_prompt_string_and_repr(folders):
    tok = load_tokenizer(folders["clip_eos"])
    assert isinstance(tok, PromptTokenizer) and "clip" in repr(tok)
    assert torch.equal(tok("a cat", 20), tok(["a cat"], 20))


def test_errors(tmp_path, folders):
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    with pytest.raises(TokenizerError, match="no tokenizer files.*README.md"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spiece.model").write_bytes(b"\xff\xff\xff\xff not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="max_length"):
        load_tokenizer(folders["clip_eos"])(["x"], 1)
