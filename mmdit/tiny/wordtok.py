"""A word-level tokenizer for closed-vocabulary captions (the tiny model's text encoder).

Text is lower-cased and split into words and punctuation marks; each maps to an id from a
``vocab.json`` (``{"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, "a": 4, ...}``); a word
outside it becomes ``<unk>``, with a warning naming it and the vocabulary (once per word).
``tok(prompts, max_length)`` gives ``<bos> words <eos> <pad>...``
as a (B, max_length) LongTensor, CLIP-style (the pooled state is read at the first ``<eos>``).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence

import torch

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """``"A red circle, blue background"`` -> ``["a", "red", "circle", ",", "blue", "background"]``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Words -> ids from a fixed vocabulary; the four special tokens come first (ids 0-3)."""

    def __init__(self, vocab: dict[str, int]):
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}; it needs all of {SPECIALS}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"vocabulary ids must be 0..{len(vocab) - 1} without gaps or repeats")
        self.vocab = dict(vocab)
        self.words = {i: w for w, i in vocab.items()}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (vocab[s] for s in SPECIALS)
        self._warned: set[str] = set()

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """Specials first, then the distinct words in sorted order."""
        extra = sorted(set(words) - set(SPECIALS))
        return cls({w: i for i, w in enumerate(list(SPECIALS) + extra)})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordTokenizer:
        try:
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer vocabulary {os.fspath(path)!r} not found; "
                                    f"it is the vocab.json saved next to the model") from None
        return cls(vocab)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, indent=0, sort_keys=False)
            f.write("\n")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text``, without specials; unknown words warn once and become ``<unk>``."""
        words = split_words(text)
        unknown = sorted({w for w in words if w not in self.vocab} - self._warned)
        if unknown:
            self._warned.update(unknown)
            known = [w for w in self.vocab if w not in SPECIALS]
            words_known = " ".join(w for w in known if w.isalnum())
            marks = " ".join(w for w in known if not w.isalnum())
            warnings.warn(f"the tiny model does not know the word(s) {', '.join(map(repr, unknown))}; they become "
                          f"<unk>. It knows: {words_known}" + (f" (and the marks {marks})" if marks else ""),
                          stacklevel=3)
        return [self.vocab.get(w, self.unk_id) for w in words]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> words joined by spaces, specials dropped."""
        return " ".join(self.words[int(i)] for i in ids if self.words[int(i)] not in SPECIALS)

    def __call__(self, prompts: str | Sequence[str], max_length: int = 16) -> torch.Tensor:
        """(B, max_length) ids: ``<bos> words <eos> <pad>...``; longer texts are cut so that
        ``<eos>`` stays last."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <bos> and <eos>, got {max_length}")
        out = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(prompts):
            ids = [self.bos_id] + self.encode(text)[:max_length - 2] + [self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids)
        return out
