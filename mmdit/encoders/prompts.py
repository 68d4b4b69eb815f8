"""Prompts -> text conditioning with a decoder LM, as the official pipelines build it.

Each family's recipe is data (:data:`PROMPT_FORMATS`): the rendered chat template around the
prompt, how the batch is padded and truncated, which hidden states are taken, what is dropped.

* FLUX.2 [dev] (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``, BFL ``Mistral3SmallEmbedder``):
  Mistral's system message and template, ``[IMG]`` removed from prompts, left-padded and
  truncated to 512 tokens, hidden states 10 / 20 / 30 concatenated per token -> (B, 512, 3 * 5120).
* FLUX.2 [klein] (``Flux2KleinPipeline._get_qwen3_prompt_embeds``, BFL ``Qwen3Embedder``): Qwen3's
  template with ``enable_thinking=False``, no system turn, right-padded to 512, states 9 / 18 / 27.
  Both FLUX.2 recipes keep the padding: the DiT attends to all 512 positions, no mask.
* Qwen-Image 1.0 (``QwenImagePipeline._get_qwen_prompt_embeds``): its system prompt, padded to the
  longest, the last layer after the final norm, the first 34 tokens (system turn + ``<|im_start|>
  user\\n``) dropped, each prompt's tokens re-padded on the right with a mask; at most 512 kept.
* Qwen-Image 2.1 (``QwenImage21Pipeline._get_qwen_prompt_embeds``, text only): its system prompt,
  left-padded to the longest, the last layer *before* the final norm, the system turn dropped
  (its token count, 14 with the real vocabulary), re-padded right with a mask; empty prompts -> " ".

``LMText(tokenizer, encoder, fmt)(prompts, max_sequence_length=None)`` returns ``{"context":
(B, L, D)}`` for FLUX.2 and ``{"context", "context_mask": (B, L) long 0/1}`` for Qwen-Image (the
diffusers pipelines pass ``None`` for an all-ones mask; the mask is always returned here).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat_tokenizer import ChatTokenizer, load_chat_tokenizer
from .decoder_lm import DecoderLM
from .tokenizers import TokenizerError

MISTRAL_SYSTEM = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")
QWEN_IMAGE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                     "relationships of the objects and background:")
QWEN_IMAGE_21_SYSTEM = "Comprehend and analyze the provided prompt."


@dataclass(frozen=True)
class PromptFormat:
    template: str  # the rendered chat template, "{}" where the prompt goes
    side: str  # padding side
    length: int | None  # default max_sequence_length: pad/truncate to it (fixed) or keep at most it (unpad)
    layers: tuple[int, ...] = (-1,)  # hidden_states indices concatenated per token; -1 = the last layer
    final_norm: bool = False  # the last layer after the final norm instead (Qwen-Image 1.0)
    fixed: bool = True  # pad every prompt to `length` (FLUX.2); False: pad to the longest (Qwen-Image)
    unpad: bool = False  # keep each prompt's own tokens (after `drop`), re-padded right, with a mask
    drop: int | str = 0  # leading tokens dropped; a string: as many tokens as it tokenizes to
    tokenizer_limit: int | None = None  # truncation of the tokenized template when not `fixed`
    add_special_tokens: bool = True  # False where the template writes BOS itself (Mistral)
    remove: tuple[str, ...] = ()  # substrings taken out of every prompt
    empty: str | None = None  # what an empty prompt becomes

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError(f"a prompt template has exactly one '{{}}', got {self.template!r}")
        if self.side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {self.side!r}")

    def text(self, prompt: str) -> str:
        for s in self.remove:
            prompt = prompt.replace(s, "")
        if not prompt and self.empty is not None:
            prompt = self.empty
        head, tail = self.template.split("{}")
        return head + prompt + tail


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "flux.2-dev": PromptFormat(
        template=f"<s>[SYSTEM_PROMPT]{MISTRAL_SYSTEM}[/SYSTEM_PROMPT][INST]{{}}[/INST]", side="left", length=512,
        layers=(10, 20, 30), add_special_tokens=False, remove=("[IMG]",)),
    "flux.2-klein": PromptFormat(
        template="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", side="right",
        length=512, layers=(9, 18, 27)),
    "qwen-image": PromptFormat(
        template=f"<|im_start|>system\n{QWEN_IMAGE_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
                 "<|im_start|>assistant\n", side="right", length=512, final_norm=True, fixed=False, unpad=True,
        drop=34, tokenizer_limit=1024 + 34),
    "qwen-image-2.1": PromptFormat(
        template=f"<|im_start|>system\n{QWEN_IMAGE_21_SYSTEM}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n"
                 "<|im_start|>assistant\n", side="left", length=None, fixed=False, unpad=True,
        drop=f"<|im_start|>system\n{QWEN_IMAGE_21_SYSTEM}<|im_end|>\n", empty=" "),
}
# the transformer presets' names, for callers that hold those (klein 4B / 9B, base or distilled: one recipe)
PROMPT_FORMATS["flux.2-klein-4b"] = PROMPT_FORMATS["flux.2-klein-9b"] = PROMPT_FORMATS["flux.2-klein"]


@dataclass
class LMText:
    """prompts -> {"context": (B, L, D') [, "context_mask": (B, L)]} with one decoder LM."""

    tokenizer: ChatTokenizer
    encoder: DecoderLM
    fmt: PromptFormat

    def __post_init__(self):
        d = self.fmt.drop
        self.drop = len(self.tokenizer.encode(d)) if isinstance(d, str) else d

    def tokenize(self, prompts: str | Sequence[str], max_sequence_length: int | None = None):
        """(ids, mask), both (B, L) long on the CPU, as the pipeline's tokenizer call makes them."""
        f = self.fmt
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = max_sequence_length or f.length
        if f.fixed and n is None:
            raise ValueError("this prompt format pads to a fixed length: pass max_sequence_length")
        return self.tokenizer([f.text(p) for p in prompts], max_length=n if f.fixed else f.tokenizer_limit,
                              pad_to_max=f.fixed, side=f.side, add_special_tokens=f.add_special_tokens)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], max_sequence_length: int | None = None) -> dict:
        f = self.fmt
        ids, mask = self.tokenize(prompts, max_sequence_length)
        device = self.encoder.embed_tokens.weight.device
        if f.final_norm:
            states = [self.encoder(ids.to(device), mask.to(device))]
        else:
            states = self.encoder.hidden_states(ids.to(device), mask.to(device), f.layers)
        h = torch.stack(states, dim=2).flatten(2)  # (B, L, n * D): per token [h_a | h_b | ...]
        if not f.unpad:
            return {"context": h}
        return unpad(h, mask, self.drop, max_sequence_length or f.length)


def unpad(h: torch.Tensor, mask: torch.Tensor, drop: int, keep: int | None) -> dict:
    """Each row's tokens (``mask`` is on the CPU), the first ``drop`` dropped, at most ``keep``
    kept, zero-padded on the right to the longest; the mask says which are tokens."""
    rows = [row.nonzero().flatten()[drop:][:keep] for row in mask.bool()]  # CPU: no device sync
    L = max(len(r) for r in rows)
    context = h.new_zeros(len(rows), L, h.shape[-1])
    out_mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        context[i, :len(r)] = h[i, r.to(h.device)]
        out_mask[i, :len(r)] = 1
    return {"context": context, "context_mask": out_mask.to(h.device)}


def load_lm_text(family: str, source: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu") -> LMText:
    """The text side of a FLUX.2 / Qwen-Image pipeline.

    ``source``: the pipeline folder (``text_encoder/`` + ``tokenizer/`` or ``processor/``), or the
    text encoder alone (a folder or a single file, ComfyUI's included) with ``tokenizer`` = a
    tokenizer folder (or a tekken.json); ComfyUI's Mistral file carries its own (``tekken_model``).
    FLUX.2's encoders load only the layers their hidden states need (30 of Mistral's 40, 27 of
    Qwen3's 36).
    """
    from ..weights.decoder_lm import load_decoder_lm

    if family not in PROMPT_FORMATS:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(PROMPT_FORMATS)}")
    fmt = PROMPT_FORMATS[family]
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; pass a pipeline folder, or the text encoder's folder or "
                                "file with tokenizer= its tokenizer folder")
    if tokenizer is None and root.is_file():
        tokenizer = root  # ComfyUI's Mistral file: its tekken_model tensor
    elif tokenizer is None:
        found = [root / d for d in ("tokenizer", "processor") if (root / d).is_dir()]
        found += [root] if (root / "tokenizer.json").is_file() or (root / "tekken.json").is_file() else []
        if not found:
            raise TokenizerError(f"{root} has no tokenizer/ or processor/ folder nor tokenizer.json; pass "
                                 "tokenizer= the folder holding tokenizer.json")
        tokenizer = found[0]
    deepest = None if fmt.final_norm or -1 in fmt.layers else max(fmt.layers)
    encoder = load_decoder_lm(root, dtype=dtype, device=device, num_layers=deepest)
    return LMText(load_chat_tokenizer(tokenizer), encoder, fmt)
