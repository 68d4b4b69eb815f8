"""The text conditioning of SD3 / SD3.5, FLUX.1 and Chroma: CLIP and T5 states as each transformer takes them.

Each is a callable ``text(prompts, max_sequence_length) -> {name: tensor}``, the transformer's
conditioning inputs by name (the LM-encoded families' are ``encoders.prompts.LMText``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SD3Text:
    """CLIP-L + CLIP-G penultimate states zero-padded to the T5 width, then T5; pooled = both projections."""

    tokenizers: tuple  # clip_l, clip_g, t5 (or None)
    encoders: tuple
    context_dim: int

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict:
        (tok_l, tok_g, tok_t5), (clip_l, clip_g, t5) = self.tokenizers, self.encoders
        out_l, out_g = clip_l(_ids(tok_l, prompts, 77, clip_l)), clip_g(_ids(tok_g, prompts, 77, clip_g))
        clip = torch.cat([out_l.penultimate, out_g.penultimate], dim=-1)  # (B, 77, 768 + 1280)
        if t5 is None:  # as diffusers: zeros in place of the T5 states
            t5_states = clip.new_zeros(len(prompts), max_sequence_length, self.context_dim)
        else:
            t5_states = t5(_ids(tok_t5, prompts, max_sequence_length, t5))
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"context": torch.cat([clip, t5_states.to(clip.dtype)], dim=1),
                "pooled": torch.cat([_projected(out_l), _projected(out_g)], dim=-1)}


@dataclass
class FluxText:
    """T5 states as context; CLIP-L pooled output (no projection) as the pooled vector."""

    tokenizers: tuple  # clip_l, t5
    encoders: tuple

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict:
        (tok_l, tok_t5), (clip_l, t5) = self.tokenizers, self.encoders
        pooled = clip_l(_ids(tok_l, prompts, 77, clip_l)).pooled
        return {"context": t5(_ids(tok_t5, prompts, max_sequence_length, t5)), "pooled": pooled}


@dataclass
class ChromaText:
    """T5 alone, run with the tokenizer's mask; the transformer's ``context_mask`` keeps the prompt, its EOS
    and one pad token more (the official training rule, as diffusers' ChromaPipeline builds it)."""

    tokenizer: object
    encoder: object

    def __call__(self, prompts: list[str], max_sequence_length: int) -> dict:
        ids, mask = self.tokenizer.with_mask(prompts, max_sequence_length)
        device = next(self.encoder.parameters()).device
        context = self.encoder(ids.to(device), mask.to(device))  # (B, L, Dc)
        kept = torch.arange(ids.shape[1])[None] <= mask.sum(1, keepdim=True)  # (B, L): one pad token more
        return {"context": context, "context_mask": kept}


def _ids(tokenizer, prompts, length, encoder) -> torch.Tensor:
    return tokenizer(prompts, length).to(next(encoder.parameters()).device)


def _projected(out):
    return out.projected if out.projected is not None else out.pooled
