"""FLUX.2 peers: diffusers' ``Flux2Transformer2DModel`` with random weights, run in our call
convention, and its checkpoints in BFL's layout. Test-only (imports diffusers on first use: ``peers.diffusers()``).

    peer = flux2_peer(num_double=1, num_single=2, guidance=True)
    x, sigma, ctx, guidance, refs = inputs(peer, refs=((1, 4, 3),))
    v = run_peer(peer, x, sigma, ctx, guidance, refs)       # (B, 128, h, w), as our model returns
    save(bfl_state(peer, prefix=""), tmp / "flux2.safetensors")
"""
from __future__ import annotations

import functools
import json

from typing import TYPE_CHECKING

import torch

from mmdit.weights import keymaps

from peers import diffusers, randomize, save, single_file_utils  # noqa: F401  (save: re-exported for the tests)

if TYPE_CHECKING:
    from diffusers import Flux2Transformer2DModel

FAMILY = "flux2"


def flux2_peer(num_double=1, num_single=2, heads=2, head_dim=128, axes=None, context_dim=32, in_channels=128,
               guidance=True, seed=0) -> Flux2Transformer2DModel:
    """A small diffusers FLUX.2 (no biases; SwiGLU 3x; 4 equal RoPE axes unless ``axes``)."""
    torch.manual_seed(seed)
    peer = diffusers().Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_double, num_single_layers=num_single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        axes_dims_rope=tuple(axes or (head_dim // 4,) * 4), guidance_embeds=guidance)
    return randomize(peer, seed)


def hidden(peer) -> int:
    return peer.config.num_attention_heads * peer.config.attention_head_dim


def inputs(peer, B=3, h=6, w=5, L=7, refs=(), seed=1):
    """x (B, C, h, w), sigma (B,) all different, context (B, L, ctx), guidance (B,) or None, and
    ``refs`` reference latents: one (rows, h_i, w_i) each -> (rows, C, h_i, w_i), rows B or 1."""
    g = torch.Generator().manual_seed(seed)
    C = peer.config.in_channels
    x = torch.randn(B, C, h, w, generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.05
    ctx = torch.randn(B, L, peer.config.joint_attention_dim, generator=g)
    guid = 1.0 + 4.0 * torch.rand(B, generator=g) if peer.config.guidance_embeds else None
    refs = tuple(torch.randn(n, C, hi, wi, generator=g) for n, hi, wi in refs) or None
    return x, sigma, ctx, guid, refs


def _grid_ids(h, w, t=0):
    ids = torch.zeros(h, w, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4)


def _tokens(t):
    return t.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), as diffusers' pipelines pack


@torch.no_grad()
def run_peer(peer, x, sigma, context, guidance=None, refs=None) -> torch.Tensor:
    """The peer's velocity for our inputs, as (B, C, h, w); references are appended after the
    image's tokens with time ids 10, 20, ... and cut from the output, as Flux2Pipeline does."""
    B, C, h, w = x.shape
    tokens, ids = [_tokens(x)], [_grid_ids(h, w)]
    for i, r in enumerate(refs or ()):
        tokens.append(_tokens(r.expand(B, -1, -1, -1)))
        ids.append(_grid_ids(r.shape[2], r.shape[3], 10 * (i + 1)))
    L = context.shape[1]
    txt_ids = torch.zeros(L, 4)
    txt_ids[:, 3] = torch.arange(L)
    out = peer(hidden_states=torch.cat(tokens, 1), encoder_hidden_states=context, timestep=sigma, guidance=guidance,
               img_ids=torch.cat(ids), txt_ids=txt_ids, return_dict=False)[0]
    return out[:, :h * w].transpose(1, 2).reshape(B, C, h, w)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def parity(model, peer, seed: int = 1, **shape) -> float:
    """max|ours - peer| / max|peer| of the velocities for ``inputs(peer, seed=seed, **shape)``."""
    x, sigma, ctx, guid, refs = inputs(peer, seed=seed, **shape)
    want = run_peer(peer, x, sigma, ctx, guid, refs)
    with torch.no_grad():
        got = model(x, sigma, ctx, guidance=guid, refs=refs)
    assert got.shape == want.shape == x.shape
    return rel(got, want)


# ---- state dicts in each layout ------------------------------------------------------------

def diffusers_state(peer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in peer.state_dict().items()}


def bfl_state(peer, prefix: str = "") -> dict[str, torch.Tensor]:
    """BFL's layout (ours = BFL names), written through our key map, ``prefix`` before every key."""
    ours = keymaps.from_diffusers(diffusers_state(peer), FAMILY, hidden(peer))
    return {k: v.contiguous() for k, v in keymaps.to_original(ours, prefix).items()}


def diffusers_convert(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own BFL -> diffusers converter; it does not strip a prefix, so pass bare keys."""
    return single_file_utils().convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))


# ---- full-size shapes without allocating ---------------------------------------------------

FULL = {
    "flux.2-dev": dict(),
    "flux.2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                            guidance_embeds=False),
    "flux.2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                            guidance_embeds=False),
}


@functools.lru_cache(maxsize=None)
def full_size(name: str):
    """(diffusers state dict on meta, its config dict) for an official FLUX.2, built on ``meta``."""
    with torch.device("meta"):
        peer = diffusers().Flux2Transformer2DModel(**FULL[name])
    return dict(peer.state_dict()), dict(peer.config)


# ---- our model alone: tiny random FLUX.2 for the row / branch / graph tests ----------------

TINY = dict(num_double=2, num_single=2, num_heads=2, head_dim=16, in_channels=16, context_dim=24)  # axes (4,)*4


def tiny(guidance: bool = True, seed: int = 0, **extra):
    """Our FLUX.2 ([dev]-like with ``guidance``, else [klein]-like), weights N(0, 0.1)."""
    import mmdit

    torch.manual_seed(seed)
    model = mmdit.build_transformer("flux.2-dev" if guidance else "flux.2-klein-4b", **{**TINY, **extra}).eval()
    for p in model.parameters():  # torch's zero/one inits would hide wiring mistakes
        p.data.normal_(0, 0.1)
    return model


def tiny_inputs(model, B=3, h=4, w=3, L=5, refs=(), seed=1):
    """x (B, C, h, w), sigma (B,), context (B, L, Dc), guidance (B,) or None, refs as ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    sigma = torch.rand(B, generator=g)
    ctx = torch.randn(B, L, cfg.context_dim, generator=g)
    guidance = torch.full((B,), 4.0) if cfg.guidance_embed else None
    refs = tuple(torch.randn(n, cfg.in_channels, hi, wi, generator=g) for n, hi, wi in refs) or None
    return x, sigma, ctx, guidance, refs


# ---- tiny saved Flux2Pipeline / Flux2KleinPipeline folders (research notes 8.5) ------------

# head_dim 128 (FLUX.2's) so that a file without config.json has a known RoPE split; 4 VAE channels patchified 2x2
PIPE = dict(num_double=1, num_single=1, heads=2, head_dim=128, in_channels=16)


def scheduler():
    """The FLUX.2 repos' scheduler config (FLUX.1-dev's); the pipelines pass mu, so its shifts go unused."""
    diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def pipeline_folder(root, kind: str, is_distilled: bool | None = None, seed: int = 0):
    """A tiny diffusers FLUX.2 pipeline saved to ``root``: "dev" (Flux2Pipeline: a 31-layer Mistral3, its
    states 10 / 20 / 30; guidance embedding) or "klein" (Flux2KleinPipeline: a 28-layer Qwen3, states 9 / 18
    / 27; ``is_distilled`` in model_index.json unless None). Width 32 LMs, 1 + 1 blocks, the 3-level VAE
    (8 pixels per token) with random BatchNorm statistics. Returns (folder, the diffusers pipeline)."""
    from pathlib import Path

    diffusers()
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    import peers_lm as P
    import peers_vae
    from helpers import corpus
    from mmdit.encoders.prompts import MISTRAL_SYSTEM

    root = Path(root)
    if kind == "dev":
        tok = P.write_mistral_tokenizer(root / "tok", corpus() + [MISTRAL_SYSTEM] * 3)
        lm = P.mistral3(vocab=len(tok), layers=31, seed=seed + 1)
    else:
        tok = P.write_qwen_tokenizer(root / "tok", P.QWEN3_TEMPLATE)
        lm = P.qwen3(vocab=len(tok), layers=28, seed=seed + 1)
    tr = flux2_peer(**PIPE, context_dim=3 * 32, guidance=kind == "dev", seed=seed + 2)
    parts = dict(scheduler=scheduler(), vae=peers_vae.flux2_peer(seed=seed + 3), text_encoder=lm, tokenizer=tok,
                 transformer=tr)
    pipe = Flux2Pipeline(**parts) if kind == "dev" else Flux2KleinPipeline(**parts, is_distilled=bool(is_distilled))
    pipe.save_pretrained(root / "pipe")
    if kind == "klein" and is_distilled is None:  # a folder that does not say
        index = json.loads((root / "pipe" / "model_index.json").read_text())
        index.pop("is_distilled")
        (root / "pipe" / "model_index.json").write_text(json.dumps(index))
    return root / "pipe", pipe
