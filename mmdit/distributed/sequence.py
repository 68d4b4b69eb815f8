"""Sequence parallelism for one image: tokens split over ranks, Ulysses all-to-all around attention.

DeepSpeed-Ulysses (Jacobs et al. 2023), as xDiT and ParaAttention run it for DiTs. With P ranks,
after the embeddings every stream (text and image tokens) is cut into P contiguous pieces, one
per rank (``shard``); everything but attention acts on one token at a time, so each rank runs
the blocks on its own tokens. Around each attention:

    q, k, v   (B, H, L_r, Dh)      this rank's tokens, every head
        all-to-all                 rank r sends head group j of its tokens to rank j
              (B, H/P, L, Dh)      every token, this rank's H/P heads
        attention                  the whole sequence (its order is rank by rank:
                                   [text_0 ; image_0 ; text_1 ; image_1 ...], a permutation,
                                   which unmasked attention does not see)
        all-to-all back            (B, H, L_r, Dh)

Two all-to-alls per attention (q, k and v together, then the output back), and one gather of
the output tokens per forward; the weights are on every rank. Heads must divide by P. Rows travel whole, so the DG
fork (born at block m from the cond rows) and the other branches work unchanged, and
``branch.BranchParallel`` may wrap this. Token counts need not divide by P: the first pieces
are one token longer (FLUX RoPE positions are cut the same way).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..models.attention import tokens_over
from .group import CommClock, split_sizes


class TokenLayout:
    """Where the tokens of one forward live: filled by ``shard`` (the model calls it through
    ``models.attention.shard_tokens`` on its text and image streams), read by ``attention`` and
    ``gather``. Every size is a Python int: no host sync."""

    def __init__(self, rank: int, size: int, group=None, comm: CommClock | None = None):
        self.rank, self.size, self.group, self.comm = rank, size, group, comm or CommClock()
        self.streams: dict[str, tuple[int, ...]] = {}  # "text" / "image" -> tokens per rank

    def shard(self, t: torch.Tensor, stream: str, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        if n < self.size:
            raise ValueError(f"parallel='sequence' cuts every stream over {self.size} ranks; the {stream} has only "
                             f"{n} tokens: use fewer ranks or a longer text / larger image")
        sizes = self.streams.setdefault(stream, split_sizes(n, self.size))
        if sum(sizes) != n:
            raise ValueError(f"the {stream} stream was cut as {sum(sizes)} tokens and is now {n}")
        return t.narrow(dim, sum(sizes[:self.rank]), sizes[self.rank])

    def sizes_of(self, local: int) -> tuple[int, ...]:
        """Every rank's token count for a tensor with ``local`` tokens here: the image stream, or
        text and image together (joint attention). Text has >= 1 token per rank, so they differ."""
        image = self.streams["image"]
        joint = tuple(map(sum, zip(*self.streams.values())))
        for sizes in (image, joint):
            if sizes[self.rank] == local:
                return sizes
        raise ValueError(f"{local} tokens on rank {self.rank} fit neither the image stream {image} "
                         f"nor the joint sequence {joint}")

    def attention(self, q, k, v, identity=()) -> torch.Tensor:
        """q (B, H, Lq_r, Dh), k and v (B, H, Lk_r, Dh) -> (B, Lq_r, H*Dh) over every rank's keys."""
        if identity:
            raise ValueError("PAG's identity attention needs the token order; it does not run with "
                             "parallel='sequence' (use parallel='branch')")
        q_sizes, k_sizes = self.sizes_of(q.shape[2]), self.sizes_of(k.shape[2])
        B = q.shape[0]
        if q_sizes == k_sizes:  # one all-to-all for q, k and v
            q, k, v = self._to_heads(torch.cat([q, k, v]), q_sizes).split(B)
        else:  # SD3's last block: image queries, joint keys
            q, (k, v) = self._to_heads(q, q_sizes), self._to_heads(torch.cat([k, v]), k_sizes).split(B)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H/P, Lq, Dh)
        return self._to_tokens(out, q_sizes).transpose(1, 2).flatten(2)

    def _to_heads(self, t: torch.Tensor, sizes) -> torch.Tensor:
        """(B, H, L_r, Dh) -> (B, H/P, L, Dh): every rank's tokens of this rank's heads."""
        import torch.distributed as dist

        B, H, Lr, Dh = t.shape
        Hp = H // self.size
        send = t.unflatten(1, (self.size, Hp)).movedim(1, 0).contiguous()  # (P, B, Hp, L_r, Dh)
        recv = t.new_empty(B * Hp * sum(sizes) * Dh)
        with self.comm():
            dist.all_to_all_single(recv, send.flatten(), [B * Hp * n * Dh for n in sizes],
                                   [B * Hp * Lr * Dh] * self.size, group=self.group)
        pieces = recv.split([B * Hp * n * Dh for n in sizes])
        return torch.cat([p.view(B, Hp, n, Dh) for p, n in zip(pieces, sizes)], dim=2)

    def _to_tokens(self, t: torch.Tensor, sizes) -> torch.Tensor:
        """(B, H/P, L, Dh) -> (B, H, L_r, Dh): this rank's tokens of every head."""
        import torch.distributed as dist

        B, Hp, _, Dh = t.shape
        Lr = sizes[self.rank]
        send = torch.cat([p.contiguous().flatten() for p in t.split(list(sizes), dim=2)])
        recv = t.new_empty(self.size * B * Hp * Lr * Dh)
        with self.comm():
            dist.all_to_all_single(recv, send, [B * Hp * Lr * Dh] * self.size, [B * Hp * n * Dh for n in sizes],
                                   group=self.group)
        return recv.view(self.size, B, Hp, Lr, Dh).movedim(0, 1).reshape(B, self.size * Hp, Lr, Dh)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N_r, F) image tokens -> (B, N, F), in order on every rank (one all-gather)."""
        import torch.distributed as dist

        sizes = self.sizes_of(t.shape[1])
        most = max(sizes)
        padded = F.pad(t, (0, 0, 0, most - t.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        with self.comm():
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


class SequenceParallel(Denoiser):
    """A denoiser whose forwards run with the tokens split over the ranks (``TokenLayout``);
    every rank returns the whole output. Everything else is the wrapped model's; ``comm`` as in
    ``branch.BranchParallel``."""

    def __init__(self, model, transformer, rank: int, size: int, group=None):
        heads = transformer.config.num_heads
        if heads % size:
            raise ValueError(f"parallel='sequence' gives each of the {size} ranks an equal share of the "
                             f"{heads} attention heads: {heads} is not a multiple of {size}; use a number "
                             f"of ranks that divides {heads}")
        super().__init__(model)
        self.transformer, self.rank, self.size, self.group = transformer, rank, size, group
        self.comm = CommClock()  # time in the all-to-alls and the gather, when switched on

    def __call__(self, x, sigma, *inputs, **named):
        spec = getattr(self.transformer, "ma", None)
        if spec is not None and spec.token_mask is not None:
            raise ValueError("a token mask (local DG) names image tokens of the whole image; it does not run "
                             "with parallel='sequence' (use parallel='branch')")
        with tokens_over(TokenLayout(self.rank, self.size, self.group, self.comm)):
            return self.model(x, sigma, *inputs, **named)
