"""Chroma peers for the tests: a random ``ChromaTransformer2DModel``, our call convention on it
(with a real bool text mask: diffusers' pipelines turn the mask into a float, which SDPA adds as a
bias, i.e. no masking at all; diffusers#13619), the checkpoint layouts, diffusers' own converter
(shimmed for narrow widths), and a tiny saved ``ChromaPipeline`` folder.

    peer = chroma_peer()
    v = run_peer(peer, x, sigma, context, mask)        # (B, 16, H, W), our convention
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmdit.weights import keymaps

import peers

if TYPE_CHECKING:
    from diffusers import ChromaTransformer2DModel

FAMILY = "chroma"
EXTRAS = {"text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": (8,),  # stand-ins, never loaded
          "text_encoders.t5xxl.transformer.shared.weight": (6, 4), "vae.decoder.conv_in.weight": (8, 16, 3, 3)}
TINY = dict(num_double=1, num_single=2, heads=2, head_dim=16, context_dim=32, axes=(4, 6, 6), approx_in=8,
            approx_hidden=32, approx_layers=2)


def chroma_peer(num_double=1, num_single=2, heads=2, head_dim=16, context_dim=32, axes=(4, 6, 6), approx_in=8,
                approx_hidden=32, approx_layers=2, official_eps=False, seed=0) -> ChromaTransformer2DModel:
    """A random diffusers Chroma transformer. ``official_eps``: its approximator RMSNorms use eps 1e-6 as
    the official model (and ours) do, instead of diffusers' ``nn.RMSNorm`` default (the dtype's epsilon)."""
    torch.manual_seed(seed)
    peer = peers.diffusers().ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_double, num_single_layers=num_single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        axes_dims_rope=tuple(axes), approximator_num_channels=approx_in, approximator_hidden_dim=approx_hidden,
        approximator_layers=approx_layers)
    if official_eps:
        for norm in peer.distilled_guidance_layer.norms:
            norm.eps = 1e-6
    return peers.randomize(peer, seed)


def hidden(peer) -> int:
    return peer.config.num_attention_heads * peer.config.attention_head_dim


def text_mask(B: int, L: int, seed: int = 1) -> torch.Tensor:
    """(B, L) bool: each row keeps a different number (>= 1) of leading tokens, the last row all of them."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.randint(1, L, (B,), generator=g)
    kept[-1] = L
    return torch.arange(L)[None] < kept[:, None]


def inputs(peer, B=3, H=12, W=10, L=7, seed=1):
    """x (B,16,H,W), sigma (B,) all different, context (B,L,ctx), mask (B, L) bool."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, H, W, generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.05
    ctx = torch.randn(B, L, peer.config.joint_attention_dim, generator=g)
    return x, sigma, ctx, text_mask(B, L, seed)


@torch.no_grad()
def run_peer(peer, x, sigma, context, mask=None) -> torch.Tensor:
    """The peer's velocity for our inputs, as (B, 16, H, W); ``mask`` (B, L) bool, passed as diffusers'
    transformer takes it: (B, L + N) bool, outer product inside each block."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    full = None if mask is None else torch.cat([mask.bool(), torch.ones(B, h * w, dtype=torch.bool)], dim=1)
    out = peer(hidden_states=peers.pack(x), timestep=sigma, encoder_hidden_states=context,
               img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3), attention_mask=full,
               return_dict=False)[0]
    return out.view(B, h, w, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def parity(model, peer, seed: int = 1, masked: bool = True, **shape) -> float:
    """max|ours - peer| / max|peer| of the velocities for ``inputs(peer, seed=seed, **shape)``."""
    x, sigma, ctx, mask = inputs(peer, seed=seed, **shape)
    mask = mask if masked else None
    want = run_peer(peer, x, sigma, ctx, mask)
    with torch.no_grad():
        got = model(x, sigma, ctx, context_mask=mask)
    assert got.shape == want.shape == x.shape
    return rel(got, want)


# ---- checkpoint layouts --------------------------------------------------------------------

def original_state(peer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The official layout (Chroma1-HD.safetensors), written through our key map (ours = official names)."""
    ours = keymaps.from_diffusers(peers.diffusers_state(peer), FAMILY, hidden(peer))
    return {k: v.contiguous() for k, v in keymaps.to_original(ours, prefix).items()}


def save_original(peer, path: Path, prefix: str = "", with_extras: bool = False, dtype=None) -> Path:
    sd = original_state(peer, prefix)
    if with_extras:  # a ComfyUI all-in-one file: the T5 and the VAE beside the transformer
        g = torch.Generator().manual_seed(7)
        sd.update({k: torch.randn(s, generator=g) for k, s in EXTRAS.items()})
    return peers.save(sd, path, dtype)


def save_diffusers_folder(peer, folder: Path, max_shard_size=None, pipeline: bool = False) -> Path:
    folder = Path(folder)
    target = folder / "transformer" if pipeline else folder
    peer.save_pretrained(str(target), safe_serialization=True,
                         **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if pipeline:
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "ChromaPipeline", "transformer": ["diffusers", "ChromaTransformer2DModel"]}))
    return folder


@functools.lru_cache(maxsize=None)
def _converter(inner_dim: int):
    """diffusers' Chroma converter hard-codes ``inner_dim = 3072`` for the split of ``linear1``;
    recompile its own source with a small model's width (as peers does for FLUX.1)."""
    sfu = peers.single_file_utils()
    src = inspect.getsource(sfu.convert_chroma_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers changed its Chroma converter; update this shim"
    namespace = dict(vars(sfu))
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), sfu.__file__, "exec"), namespace)
    return namespace["convert_chroma_transformer_checkpoint_to_diffusers"]


def diffusers_convert(original: dict[str, torch.Tensor], width: int = 3072) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter on an official-layout state dict (``model.diffusion_model.`` allowed)."""
    sfu = peers.single_file_utils()
    convert = sfu.convert_chroma_transformer_checkpoint_to_diffusers if width == 3072 else _converter(width)
    return convert(dict(original))


@functools.lru_cache(maxsize=None)
def full_size():
    """(diffusers state dict on meta, its config) of the released Chroma, built on ``meta``."""
    with torch.device("meta"):
        peer = peers.diffusers().ChromaTransformer2DModel()
    return dict(peer.state_dict()), dict(peer.config)


# ---- a tiny saved ChromaPipeline ------------------------------------------------------------

def _t5(d_model: int, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    return peers.randomize(T5EncoderModel(cfg).eval(), seed, std=0.2)


def _vae(seed: int):
    peers.diffusers()
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159)  # the FLUX.1 VAE's latent scaling
    return peers.randomize(model.eval(), seed, std=0.1)


def pipeline_folder(root: Path):
    """A tiny ChromaPipeline saved to ``root/pipe`` (T5 of width 32, 1 double + 2 single blocks, the 2x VAE;
    the scheduler with the dynamic shift of the official sampler). Returns (folder, the pipeline)."""
    peers.diffusers()
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import T5TokenizerFast

    from helpers import write_t5_tokenizer

    tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(Path(root) / "tok"))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(transformer=chroma_peer(seed=1), scheduler=scheduler, vae=_vae(2),
                          text_encoder=_t5(TINY["context_dim"], len(tokenizer), 5), tokenizer=tokenizer)
    pipe.save_pretrained(Path(root) / "pipe")
    return Path(root) / "pipe", pipe


@torch.no_grad()
def peer_embeds(pipe, prompts, negatives, max_sequence_length: int) -> dict:
    """diffusers' own prompt embeddings for ``prompts`` and ``negatives``, with its masks as bool (the
    pipeline's keyword arguments), so the transformer masks the padding (diffusers#13619)."""
    out = pipe.encode_prompt(prompts, negative_prompt=negatives, do_classifier_free_guidance=True,
                             max_sequence_length=max_sequence_length)
    embeds, _, mask, neg_embeds, _, neg_mask = out
    return dict(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=neg_embeds,
                negative_prompt_attention_mask=neg_mask.bool())
