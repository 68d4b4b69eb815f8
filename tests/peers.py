"""diffusers peers with random weights, and writers for every checkpoint layout.

Test-only. diffusers is imported on first use (``diffusers()``): where it is not installed (the
GPU machine), the files that import this module still collect and a test that builds a peer is
skipped with ``REASON``. Other tests may reuse these:

    peer = sd3_peer(num_layers=2, qk_norm=True, dual=(0,))
    save_original(peer, tmp / "sd3.safetensors")          # Stability all-in-one layout
    v_ref = run_peer(peer, x, sigma, context, pooled)      # our call convention
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import save_file

from helpers import write_clip_tokenizer, write_t5_tokenizer
from mmdit.weights import keymaps

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

REASON = "needs diffusers, the tests' reference peer (pip install -e '.[test]'; on a GPU machine: benchmarks/gpu_wheels.sh)"

STD = 0.05  # noise added to every weight and buffer, so zero/one inits don't hide wiring mistakes
# Small stand-ins for the other components of all-in-one files (never loaded by load_transformer).
EXTRAS = {
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (8,),
    "text_encoders.clip_g.transformer.text_projection.weight": (4, 4),
    "text_encoders.t5xxl.transformer.shared.weight": (6, 4),
    "first_stage_model.decoder.conv_in.weight": (8, 16, 3, 3),
    "first_stage_model.encoder.conv_out.bias": (32,),
}
FLUX_EXTRAS = {"vae.decoder.conv_in.weight": (8, 16, 3, 3),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (8,)}


def diffusers():
    """The diffusers package, imported now; the calling test is skipped with ``REASON`` where it is missing."""
    return pytest.importorskip("diffusers", reason=REASON)


def single_file_utils():
    """diffusers' single-file converters (``diffusers.loaders.single_file_utils``)."""
    diffusers()
    return importlib.import_module("diffusers.loaders.single_file_utils")


def randomize(model: torch.nn.Module, seed: int, std: float = STD) -> torch.nn.Module:
    """Add N(0, std) noise to every parameter and buffer (pos_embed, zero-init adaLN, norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(model.state_dict(keep_vars=True).items()):
            t.add_(torch.randn(t.shape, generator=g) * std)
    return model.eval()


def sd3_peer(num_layers=2, heads=2, head_dim=64, qk_norm=False, dual=(), pos_max=8, context_dim=40,
             pooled_dim=24, seed=0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    peer = diffusers().SD3Transformer2DModel(
        sample_size=2 * pos_max, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=pos_max,
        dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk_norm else None)
    return randomize(peer, seed)


def flux_peer(num_double=1, num_single=2, heads=2, head_dim=128, guidance=True, context_dim=40,
              pooled_dim=24, axes=(16, 56, 56), seed=0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    peer = diffusers().FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_double, num_single_layers=num_single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance, axes_dims_rope=tuple(axes))
    return randomize(peer, seed)


def family(peer) -> str:
    return "sd3" if type(peer).__name__ == "SD3Transformer2DModel" else "flux"


def hidden(peer) -> int:
    return peer.config.num_attention_heads * peer.config.attention_head_dim


# ---- running a peer in our call convention -------------------------------------------------

def inputs(peer, B=3, H=12, W=10, L=7, seed=1):
    """x (B,16,H,W), sigma (B,) all different, context (B,L,ctx), pooled, guidance (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, H, W, generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.05
    ctx = torch.randn(B, L, peer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(B, peer.config.pooled_projection_dim, generator=g)
    guid = 1.0 + 4.0 * torch.rand(B, generator=g) if getattr(peer.config, "guidance_embeds", False) else None
    return x, sigma, ctx, pooled, guid


def parity(model, peer, seed: int = 1, **shape) -> float:
    """max|ours - peer| / max|peer| of the velocities for ``inputs(peer, seed=seed, **shape)``."""
    x, sigma, ctx, pooled, guid = inputs(peer, seed=seed, **shape)
    want = run_peer(peer, x, sigma, ctx, pooled, guid)
    with torch.no_grad():
        got = model(x, sigma, ctx, pooled, guidance=guid)
    assert got.shape == want.shape == x.shape
    return ((got - want).abs().max() / want.abs().max()).item()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) latents -> diffusers' packed FLUX tokens (B, h*w, 4C)."""
    B, C, H, W = latents.shape
    return latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, 4 * C)


@torch.no_grad()
def run_peer(peer, x, sigma, context, pooled, guidance=None) -> torch.Tensor:
    """The peer's velocity for our inputs, as (B, 16, H, W)."""
    if family(peer) == "sd3":
        return peer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=context,
                    pooled_projections=pooled, return_dict=False)[0]
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    packed = pack(x)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    out = peer(hidden_states=packed, timestep=sigma, guidance=guidance, encoder_hidden_states=context,
               pooled_projections=pooled, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3),
               return_dict=False)[0]
    return out.view(B, h, w, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def rounded(peer, dtype: torch.dtype):
    """A copy of ``peer`` whose weights went through ``dtype`` and back (what a file in that
    dtype holds once loaded as fp32)."""
    twin = copy.deepcopy(peer)
    with torch.no_grad():
        for t in twin.state_dict(keep_vars=True).values():
            t.copy_(t.to(dtype).float())
    return twin


# ---- state dicts in each layout ------------------------------------------------------------

def diffusers_state(peer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in peer.state_dict().items()}


def original_state(peer, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """The Stability / BFL layout, written through our key map (ours = original names)."""
    ours = keymaps.from_diffusers(diffusers_state(peer), family(peer), hidden(peer))
    return {k: v.contiguous() for k, v in keymaps.to_original(ours, prefix).items()}


def extras(fam: str, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in (EXTRAS if fam == "sd3" else FLUX_EXTRAS).items()}


def save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in sd.items()}, str(path))
    return path


def save_original(peer, path: Path, prefix="model.diffusion_model.", with_extras=True, dtype=None) -> Path:
    sd = original_state(peer, prefix)
    if with_extras:
        sd.update(extras(family(peer)))
    return save(sd, path, dtype)


def save_diffusers_file(peer, path: Path, dtype=None) -> Path:
    """diffusers key names in one file, no config.json."""
    return save(diffusers_state(peer), path, dtype)


def save_diffusers_folder(peer, folder: Path, max_shard_size=None, pipeline=False) -> Path:
    """``save_pretrained`` (optionally sharded). ``pipeline``: inside ``transformer/`` with a model_index.json."""
    folder = Path(folder)
    target = folder / "transformer" if pipeline else folder
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    peer.save_pretrained(str(target), safe_serialization=True, **kw)
    if pipeline:
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusion3Pipeline" if family(peer) == "sd3" else "FluxPipeline",
             "transformer": ["diffusers", type(peer).__name__]}))
    return folder


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40,
                   not_downloaded: tuple[str, ...] = ()) -> Path:
    """Lay out ``models--org--name/{refs/main, snapshots/<commit>/..., trees/<commit>.json}`` as
    huggingface_hub does. The tree listing (the whole repo) also names ``not_downloaded`` files,
    as after a partial download."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(Path(src).read_bytes())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    listing = {rel: {"size": 1, "blob_id": "0" * 40} for rel in [*files, *not_downloaded]}
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snap


# ---- diffusers' own single-file converters (the proof for the original layout) -------------

@functools.lru_cache(maxsize=None)
def _flux_converter(inner_dim: int):
    """diffusers' BFL -> diffusers converter hard-codes ``inner_dim = 3072`` for the split of
    ``linear1``; recompile its own source with the width of a small test model instead."""
    sfu = single_file_utils()
    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1, "diffusers changed its FLUX converter; update this shim"
    namespace = dict(vars(sfu))
    exec(compile(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), sfu.__file__, "exec"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def diffusers_convert(original: dict[str, torch.Tensor], fam: str, width: int = 3072) -> dict[str, torch.Tensor]:
    """Run diffusers' single-file converter on an original-layout state dict (prefix allowed;
    other components must be removed first)."""
    sd, sfu = dict(original), single_file_utils()
    if fam == "sd3":
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers(sd)
    convert = sfu.convert_flux_transformer_checkpoint_to_diffusers if width == 3072 else _flux_converter(width)
    return convert(sd)


# ---- full-size shapes without allocating ---------------------------------------------------

FULL = {
    "sd3-medium": ("SD3Transformer2DModel", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                               pos_embed_max_size=192)),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                 pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                                 qk_norm="rms_norm")),
    "sd3.5-large": ("SD3Transformer2DModel", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                                pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux.1-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "flux.1-schnell": ("FluxTransformer2DModel", dict(guidance_embeds=False)),
}
SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048)


@functools.lru_cache(maxsize=None)
def full_size(name: str):
    """(diffusers state dict on meta, its config dict) for an official model, built on ``meta``."""
    cls, kw = FULL[name]  # the diffusers class's name, its arguments
    if cls == "SD3Transformer2DModel":
        kw = {**SD3_COMMON, **kw}
    with torch.device("meta"):
        peer = getattr(diffusers(), cls)(**kw)
    return dict(peer.state_dict()), dict(peer.config)


# ---- tiny diffusers pipeline folders (SD3, FLUX.1) -----------------------------------------

PROMPTS = ["a photo of an astronaut riding a horse on mars!", "the quick brown fox"]
T5_LEN = 12  # max_sequence_length, short to keep the test fast
H, W = 32, 24  # pixels; the tiny VAE downsamples 2x, so 16x12 latents


def clip(width, projection, vocab, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                         hidden_act="quick_gelu" if projection else "gelu", bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize(cls(cfg).eval(), seed, std=0.2)


def t5(d_model, vocab, seed):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)
    return randomize(T5EncoderModel(cfg).eval(), seed, std=0.2)


def vae(scaling, shift, seed):
    diffusers()
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=scaling, shift_factor=shift)
    return randomize(model.eval(), seed, std=0.1)


def tokenizer_files(root, names_pads):
    for name, pad in names_pads:
        write_clip_tokenizer(root / name, pad=pad) if pad else write_t5_tokenizer(root / name)


def sd3_folder(root, **transformer):
    """A tiny SD3.5-medium-like pipeline (dual attention in block 0, qk norm); ``transformer``
    overrides the transformer's config (e.g. SD3-medium: no qk norm, no dual attention)."""
    diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    tokenizer_files(root / "tok", [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"), ("tokenizer_3", None)])
    toks = [CLIPTokenizer.from_pretrained(root / "tok/tokenizer"), CLIPTokenizer.from_pretrained(root / "tok/tokenizer_2"),
            T5TokenizerFast.from_pretrained(root / "tok/tokenizer_3")]
    config = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=80, caption_projection_dim=32, pooled_projection_dim=64,
                  out_channels=16, pos_embed_max_size=12, dual_attention_layers=(0,), qk_norm="rms_norm")
    transformer = SD3Transformer2DModel(**{**config, **transformer})
    pipe = StableDiffusion3Pipeline(
        transformer=randomize(transformer.eval(), 1), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(1.5305, 0.0609, 2), text_encoder=clip(32, True, len(toks[0]), 3), tokenizer=toks[0],
        text_encoder_2=clip(32, True, len(toks[1]), 4), tokenizer_2=toks[1],
        text_encoder_3=t5(80, len(toks[2]), 5), tokenizer_3=toks[2])
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


def flux_folder(root):
    diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    tokenizer_files(root / "tok", [("tokenizer", "<|endoftext|>"), ("tokenizer_2", None)])
    toks = [CLIPTokenizer.from_pretrained(root / "tok/tokenizer"), T5TokenizerFast.from_pretrained(root / "tok/tokenizer_2")]
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=40,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=randomize(transformer.eval(), 1), scheduler=scheduler,
                        vae=vae(0.3611, 0.1159, 2), text_encoder=clip(32, False, len(toks[0]), 3), tokenizer=toks[0],
                        text_encoder_2=t5(40, len(toks[1]), 5), tokenizer_2=toks[1])
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe
