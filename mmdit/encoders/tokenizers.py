"""Prompts -> token ids, exactly as the SD3 / FLUX diffusers pipelines build them.

Reads the files hub tokenizer folders hold and rebuilds the pipeline transformers (5.x)
builds from them, on the ``tokenizers`` library:

* CLIP (``vocab.json`` + ``merges.txt``, or a BPE ``tokenizer.json``): NFC, whitespace runs
  -> " ", lowercase; CLIP's split regex; byte-level BPE with a ``</w>`` word suffix;
  ``<|startoftext|> ... <|endoftext|>``; padded with the configured pad token
  (``<|endoftext|>`` for CLIP-L, ``!`` = id 0 for SD3's CLIP-G ``tokenizer_2``).
* T5 (``tokenizer.json`` or ``spiece.model``): SentencePiece unigram with its precompiled
  normalizer, whitespace split + metaspace; no BOS; ``</s>`` appended; padded with 0.

Special tokens are matched in the raw prompt as transformers does (so with pad ``!`` a literal
``!`` becomes id 0, diffusers issue #4153). Truncation keeps the final EOS.
"""
from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer folder that can't be used: the message says what is missing."""


class PromptTokenizer:
    """``tok(prompts, max_length) -> (B, max_length)`` LongTensor: [BOS] ids[:n] EOS pad..."""

    def __init__(self, backend: Tokenizer, *, kind: str, eos: int, pad: int, bos: int | None = None,
                 max_length: int | None = None):
        self.backend = backend
        self.kind = kind  # "clip" | "t5"
        self.bos, self.eos, self.pad = bos, eos, pad
        self.max_length = max_length  # tokenizer_config's model_max_length, the default length

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS, truncation or padding."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        return self.with_mask(prompts, max_length)[0]

    def with_mask(self, prompts: str | Sequence[str],
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (B, max_length); mask is True on the tokens before the padding (EOS included),
        as transformers' ``attention_mask``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = max_length or self.max_length
        head = [] if self.bos is None else [self.bos]
        if n is None or n < len(head) + 1:
            raise ValueError(f"max_length must leave room for the special tokens, got {n}")
        rows, lengths = [], []
        for enc in self.backend.encode_batch(prompts, add_special_tokens=False):
            ids = head + enc.ids[: n - len(head) - 1] + [self.eos]
            rows.append(ids + [self.pad] * (n - len(ids)))
            lengths.append(len(ids))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(prompts), n)
        return ids, torch.arange(n)[None] < torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)

    def __repr__(self) -> str:
        return (f"PromptTokenizer({self.kind}, vocab={self.backend.get_vocab_size()}, bos={self.bos}, "
                f"eos={self.eos}, pad={self.pad}, max_length={self.max_length})")


def load_tokenizer(folder: str | Path) -> PromptTokenizer:
    """A hub tokenizer folder (``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/``) -> :class:`PromptTokenizer`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder} is not a folder; pass a tokenizer folder such as <repo>/tokenizer")
    config = _read_json(folder / "tokenizer_config.json")
    for k, v in _read_json(folder / "special_tokens_map.json").items():
        config.setdefault(k, v)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges = models.BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        return _clip(vocab, merges, config)
    if (folder / "tokenizer.json").is_file():
        tj = _read_json(folder / "tokenizer.json")
        model = tj.get("model", {})
        added = {t["id"]: t for t in tj.get("added_tokens", [])}
        if model.get("type") == "BPE":
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return _clip(model["vocab"], merges, {"added_tokens_decoder": added, **config})
        if model.get("type") == "Unigram":
            pieces = [(p, s) for p, s in model["vocab"]]
            return _t5(pieces, model.get("unk_id") or 0, _json_charsmap(tj.get("normalizer")),
                       {"added_tokens_decoder": added, **config})
        raise TokenizerError(f"{folder}/tokenizer.json holds a {model.get('type')} model; "
                             "expected CLIP's BPE or T5's Unigram")
    if (folder / "spiece.model").is_file():
        pieces, unk_id, charsmap = _read_spm(folder / "spiece.model")
        if "<extra_id_0>" not in {p for p, _ in pieces}:  # T5 sentinels follow the pieces, in reverse
            n = config.get("extra_ids", 100)
            pieces += [(f"<extra_id_{i}>", 0.0) for i in range(n - 1, -1, -1)]
        return _t5(pieces, unk_id, charsmap, config)
    found = sorted(p.name for p in folder.iterdir())
    raise TokenizerError(f"{folder} holds no tokenizer files (found {found}); expected vocab.json + merges.txt "
                         "(CLIP), tokenizer.json, or spiece.model (T5)")


def _clip(vocab: dict[str, int], merges: list[tuple[str, str]], config: dict) -> PromptTokenizer:
    unk = _content(config.get("unk_token")) or "<|endoftext|>"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": unk,
                "pad_token": "<|endoftext|>"}
    ids = _add_special_tokens(backend, {**defaults, **{k: config[k] for k in _NAMED if config.get(k)}}, config)
    return PromptTokenizer(backend, kind="clip", bos=ids["bos_token"], eos=ids["eos_token"],
                           pad=ids["pad_token"], max_length=_max_length(config, 77))


def _t5(pieces: list[tuple[str, float]], unk_id: int, charsmap: bytes | None, config: dict) -> PromptTokenizer:
    backend = Tokenizer(models.Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    defaults = {"eos_token": "</s>", "unk_token": pieces[unk_id][0], "pad_token": "<pad>"}
    named = {**defaults, **{k: config[k] for k in _NAMED[1:] if config.get(k)}}
    if "added_tokens_decoder" not in config:  # spiece.model alone: control pieces and sentinels are special
        config = {**config, "added_tokens_decoder": {
            i: p for i, (p, _) in enumerate(pieces)
            if p in (named["eos_token"], named["unk_token"], named["pad_token"]) or p.startswith("<extra_id_")}}
    ids = _add_special_tokens(backend, named, config)
    return PromptTokenizer(backend, kind="t5", eos=ids["eos_token"], pad=ids["pad_token"],
                           max_length=_max_length(config, None))


def _add_special_tokens(backend: Tokenizer, named: dict, config: dict) -> dict[str, int]:
    """Register the config's added tokens (with their flags) and the named special tokens.

    Returns the ids of the named ones. Tokens already in the vocabulary keep their ids; a
    listed id that the vocabulary can't reproduce is an error rather than a silent shift.
    """
    added = config.get("added_tokens_decoder") or {}
    for want, spec in sorted(((int(i), s) for i, s in added.items()), key=lambda t: t[0]):
        token = _added_token(spec, special=True)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        got = backend.token_to_id(token.content)
        if got != want:
            raise TokenizerError(f"added token {token.content!r} is listed with id {want} but the vocabulary "
                                 f"gives {got}; the tokenizer files disagree")
    ids = {}
    for key, spec in named.items():
        content = _content(spec)
        if backend.token_to_id(content) is None or content not in _added_contents(backend):
            backend.add_special_tokens([_added_token(spec, special=True)])
        ids[key] = backend.token_to_id(content)
    return ids


def _added_contents(backend: Tokenizer) -> set[str]:
    return {t.content for t in backend.get_added_tokens_decoder().values()}


def _added_token(spec, special: bool) -> AddedToken:
    if isinstance(spec, str):
        return AddedToken(spec, special=special, normalized=not special)
    flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
    return AddedToken(spec["content"], special=spec.get("special", special), **flags)


def _content(spec) -> str | None:
    return spec["content"] if isinstance(spec, dict) else spec


def _max_length(config: dict, default: int | None) -> int | None:
    n = config.get("model_max_length")
    return int(n) if isinstance(n, (int, float)) and n < 1e9 else default  # hub configs use 1e30 for "none"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from None


def _json_charsmap(normalizer: dict | None) -> bytes | None:
    stack = [normalizer] if normalizer else []
    while stack:
        n = stack.pop()
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
        stack.extend(n.get("normalizers") or [])
    return None


# --- the few fields of a SentencePiece ModelProto we need, read without protobuf ---------------

def _read_spm(path: Path) -> tuple[list[tuple[str, float]], int, bytes]:
    """spiece.model -> (pieces as (piece, score), id of the unknown piece, precompiled charsmap)."""
    pieces, unk_id, charsmap = [], 0, b""
    try:
        for field, value in _proto_fields(path.read_bytes()):
            if field == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
                p = dict(_proto_fields(value))
                if p.get(3) == 2:  # Type.UNKNOWN
                    unk_id = len(pieces)
                score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
                pieces.append((p[1].decode("utf-8"), score))
            elif field == 3:  # NormalizerSpec {2: precompiled_charsmap}
                charsmap = dict(_proto_fields(value)).get(2, b"")
    except (IndexError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({e!r})") from None
    if not pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model (no pieces)")
    return pieces, unk_id, charsmap


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise KeyError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        result |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return result, i
