"""Mistral's Tekken tokenizer (``tekken.json``, also ComfyUI's ``tekken_model`` tensor) as a
``tokenizers`` byte-level BPE.

Tekken is tiktoken-style: a list of byte strings by rank, a split regex, special tokens first.
Ids: the special tokens take 0..n_special-1 (missing ranks are ``<SPECIAL_i>``), vocabulary
rank r is id n_special + r, and only the first ``default_vocab_size - n_special`` ranks are used.
Byte-pair merges are implied by the ranks: a token is made from any two tokens that concatenate
to it, at its own rank's priority; a pre-tokenized piece that is itself a token is taken whole
(``ignore_merges``), as tiktoken does. This is the conversion transformers and mistral-common use.
"""
from __future__ import annotations

import base64
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .tokenizers import TokenizerError


def _byte_symbols() -> list[str]:
    """The GPT-2 byte -> printable character table byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tekken_tokenizer(raw: bytes, where: str = "tekken.json") -> Tokenizer:
    """The bytes of a tekken.json -> a ``tokenizers.Tokenizer`` with the same ids."""
    try:
        tj = json.loads(raw.decode("utf-8"))
        config, vocab = tj["config"], tj["vocab"]
        specials = tj["special_tokens"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{where} is not a Tekken tokenizer file with special_tokens ({e!r}); "
                             "use the tokenizer.json of the model's hub folder instead") from None
    n_special = config.get("default_num_special_tokens", len(specials))
    names = {s["rank"]: s["token_str"] for s in specials}
    special_names = [names.get(i, f"<SPECIAL_{i}>") for i in range(n_special)]
    size = config.get("default_vocab_size")
    ranks = [base64.b64decode(v["token_bytes"]) for v in vocab[: None if size is None else size - n_special]]
    rank_of = {tok: r for r, tok in enumerate(ranks)}

    symbols = _byte_symbols()
    text = lambda b: "".join(symbols[x] for x in b)  # noqa: E731
    candidates = []  # (rank of the product, rank of left, rank of right, left, right)
    for r, tok in enumerate(ranks):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in rank_of and right in rank_of:
                candidates.append((r, rank_of[left], rank_of[right], left, right))
    candidates.sort(key=lambda c: c[:3])
    ids = {s: i for i, s in enumerate(special_names)}
    ids.update({text(tok): n_special + r for r, tok in enumerate(ranks)})
    bpe = models.BPE(ids, [(text(c[3]), text(c[4])) for c in candidates], fuse_unk=False, ignore_merges=True)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in special_names])
    for i, s in enumerate(special_names):
        if tk.token_to_id(s) != i:
            raise TokenizerError(f"{where}: special token {s!r} got id {tk.token_to_id(s)}, expected {i}")
    return tk
