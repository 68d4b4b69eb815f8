"""Small, random stand-ins for the hub's text-encoder / VAE / tokenizer files (no downloads)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("a photo of an astronaut riding horse on mars the quick brown fox jumps over lazy dog cat sitting "
         "mat painting city night neon lights watercolor portrait woman man old young red green blue "
         "highly detailed 4k sharp focus trending artstation café naïve résumé über straße 東京 日本語 "
         "emoji 🙂 🐱 12345 3.14 don't it's we're they've i'm you'll he'd hello world").split()


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    punct = [".", "!", "?", ",", "", "!!", "...", ";", " :)"]
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 14))) + rnd.choice(punct) for _ in range(n)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable char map (its order fixes CLIP's first 256 ids: "!" = 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def write_clip_tokenizer(folder: Path, pad: str = "<|endoftext|>", vocab_size: int = 900) -> Path:
    """vocab.json / merges.txt laid out like OpenAI's (bytes, bytes+</w>, merges, BOS, EOS) + hub configs."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    decoder = {str(bos): _added("<|startoftext|>", True), str(eos): _added("<|endoftext|>", False)}
    if pad == "!":  # SD3 / SDXL tokenizer_2
        decoder = {"0": _added("!", False), **decoder}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": "<|startoftext|>",
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": "<|endoftext|>",
              "errors": "replace", "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
              "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = {"bos_token": {k: v for k, v in _added("<|startoftext|>", True).items() if k != "special"},
               "eos_token": {k: v for k, v in _added("<|endoftext|>", False).items() if k != "special"},
               "pad_token": pad,
               "unk_token": {k: v for k, v in _added("<|endoftext|>", False).items() if k != "special"}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def write_t5_tokenizer(folder: Path, vocab_size: int = 120) -> Path:
    """A unigram spiece.model trained with T5's special ids (<pad> 0, </s> 1, <unk> 2, no BOS) + hub configs."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    text.unlink()
    (folder / "spiece.vocab").unlink()
    n = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()
    decoder = {str(i): {**_added(t, False)} for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    decoder.update({str(n + 99 - i): _added(f"<extra_id_{i}>", False) for i in range(100)})
    extra = [f"<extra_id_{i}>" for i in range(100)]
    config = {"added_tokens_decoder": decoder, "additional_special_tokens": extra, "clean_up_tokenization_spaces": True,
              "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"additional_special_tokens": extra, "eos_token": _added("</s>", False),
               "pad_token": _added("<pad>", False), "unk_token": _added("<unk>", False)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (fp32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))  # untie shared storage
    return path
