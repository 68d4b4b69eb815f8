"""The tokenizers of the chat LMs used as text encoders (Mistral-Small's Tekken, Qwen's byte-level
BPE), read with the ``tokenizers`` library from the files hub folders hold.

* ``tokenizer.json`` (+ ``tokenizer_config.json`` for the pad token and added tokens): used
  as is, which is what transformers 5 does for these files (for the Qwen classes it rebuilds
  the same NFC + Qwen split + byte-level pipeline from the vocabulary and merges);
* ``tekken.json`` (Mistral's own format, and the ``tekken_model`` blob in ComfyUI's Mistral
  files): converted to the equivalent byte-level BPE, see :mod:`mmdit.encoders.tekken`.

Chat templates are not rendered here: each pipeline's rendered template is data in
:mod:`mmdit.encoders.prompts`. Special tokens written in the text (``<|im_start|>``,
``[INST]``) are matched as transformers matches them.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .tokenizers import TokenizerError, _add_special_tokens, _content, _read_json


class ChatTokenizer:
    """``tok(texts, max_length=None, pad_to_max=False, side="right") -> (ids, mask)``, both (B, L) long."""

    def __init__(self, backend: Tokenizer, pad_token: str, source: str = ""):
        self.backend = backend
        self.pad_token = pad_token
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise TokenizerError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
        self.source = source

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: {token!r} is not a token of this tokenizer")
        return i

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None, pad_to_max: bool = False,
                 side: str = "right", add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate each text's ids to ``max_length`` (on the right, as transformers does), then pad
        to ``max_length`` (``pad_to_max``) or to the longest, on ``side``; mask 1 = token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if pad_to_max and max_length is None:
            raise ValueError("pad_to_max needs a max_length")
        tk = self.backend
        try:
            if max_length is not None:
                tk.enable_truncation(max_length)
            tk.enable_padding(direction=side, pad_id=self.pad_id, pad_token=self.pad_token,
                              length=max_length if pad_to_max else None)
            encs = tk.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            tk.no_truncation()
            tk.no_padding()
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return ids, mask  # (B, L), (B, L)

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.source!r}, vocab={self.backend.get_vocab_size()}, pad={self.pad_token!r})"


def load_chat_tokenizer(source: str | Path) -> ChatTokenizer:
    """A tokenizer folder (a pipeline's ``tokenizer/`` or ``processor/``, or a model repo), a
    ``tekken.json``, or a ComfyUI Mistral ``.safetensors`` carrying ``tekken_model`` ->
    :class:`ChatTokenizer`. In a folder, ``tokenizer.json`` is preferred over ``tekken.json``."""
    source = Path(source)
    if source.is_file():
        return ChatTokenizer(_tekken(_tekken_bytes(source), str(source)), "<pad>", str(source))
    if not source.is_dir():
        raise TokenizerError(f"{source} does not exist; pass the tokenizer folder (tokenizer/ or processor/ of a "
                             "pipeline, or the text encoder's model folder), a tekken.json or a ComfyUI Mistral file")
    config = _read_json(source / "tokenizer_config.json")
    for k, v in _read_json(source / "special_tokens_map.json").items():
        config.setdefault(k, v)
    if (source / "tokenizer.json").is_file():
        try:
            backend = Tokenizer.from_file(str(source / "tokenizer.json"))
        except Exception as e:  # the Rust side raises its own exception types
            raise TokenizerError(f"{source}/tokenizer.json can't be read by `tokenizers` ({e})") from None
    elif (source / "tekken.json").is_file():
        backend = _tekken((source / "tekken.json").read_bytes(), str(source / "tekken.json"))
        config.setdefault("pad_token", "<pad>")
    else:
        found = sorted(p.name for p in source.iterdir())
        raise TokenizerError(f"{source} holds no tokenizer.json or tekken.json (found {found})")
    pad = _content(config.get("pad_token"))
    if pad is None:
        raise TokenizerError(f"{source}: tokenizer_config.json names no pad_token; the pipelines pad with it")
    _add_special_tokens(backend, {"pad_token": config["pad_token"]}, config)
    return ChatTokenizer(backend, pad, str(source))


def _tekken(raw: bytes, where: str) -> Tokenizer:
    from .tekken import tekken_tokenizer
    return tekken_tokenizer(raw, where)


def _tekken_bytes(path: Path) -> bytes:
    """A tekken.json's bytes, or those of the ``tekken_model`` tensor of a safetensors file."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            if "tekken_model" not in f.keys():
                raise TokenizerError(f"{path} carries no tokenizer (no 'tekken_model' tensor, which ComfyUI's "
                                     "Mistral files have); pass the tokenizer folder of the model's hub repo")
            return f.get_tensor("tekken_model").to(torch.uint8).flatten().numpy().tobytes()
    except TokenizerError:
        raise
    except Exception as e:  # safetensors' own error types
        raise TokenizerError(f"{path} is not a readable safetensors file ({e})") from None
