"""Qwen-Image 1.0 and 2.1 diffusers peers with random weights, run in our call convention, and
writers for their checkpoint layouts. Test-only (imports diffusers on first use: ``peers.diffusers()``).

    peer = qwen_peer()                               # QwenImageTransformer2DModel, tiny
    x, sigma, context, mask = qwen_inputs(4, 24)     # latent channels, context width
    v = run_qwen(peer, x, sigma, context, mask)      # (B, C, H, W), as our model returns it
    peer21 = qwen21_peer()                           # QwenImage21Transformer2DModel, tiny
    v = run_qwen21(peer21, x, sigma, context, mask, images, slots)

    args, kw = inputs(model_or_peer)                 # our call: model(*args, **kw); run_peer(peer, args, kw)
    source, held = write(load_peer("qwen-image"), tmp, "comfy")   # a checkpoint layout on disk
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from mmdit.weights import keymaps

import peers

if TYPE_CHECKING:
    from diffusers import QwenImage21Transformer2DModel, QwenImageTransformer2DModel

QWEN = dict(num_layers=2, heads=2, head_dim=16, context_dim=24, latent=4, axes=(8, 4, 4))
QWEN21 = dict(num_layers=2, heads=2, head_dim=16, context_dim=32, latent=8, axes=(4, 6, 6))


def qwen_peer(num_layers=2, heads=2, head_dim=16, context_dim=24, latent=4, axes=(8, 4, 4),
              seed=0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    peer = peers.diffusers().QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * latent, out_channels=latent, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=context_dim, guidance_embeds=False, axes_dims_rope=tuple(axes))
    return peers.randomize(peer, seed)


def qwen21_peer(num_layers=2, heads=2, head_dim=16, context_dim=32, latent=8, axes=(4, 6, 6), mlp_ratio=3,
                causal_condition=True, seed=0) -> QwenImage21Transformer2DModel:
    torch.manual_seed(seed)
    peer = peers.diffusers().QwenImage21Transformer2DModel(
        patch_size=1, in_channels=latent, out_channels=latent, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, context_in_dim=context_dim, mlp_ratio=mlp_ratio, axes_dims_rope=tuple(axes),
        eps=1e-6, causal_condition=causal_condition)
    return peers.randomize(peer, seed)  # the zero-centred text norm's weight gets noise too


def family(peer) -> str:
    return "qwen-image" if type(peer).__name__ == "QwenImageTransformer2DModel" else "qwen-image-2.1"


# ---- inputs ----------------------------------------------------------------------------------

def padding_mask(lengths, L: int) -> torch.Tensor:
    """(B, L) float 0/1: row b has ``lengths[b]`` tokens, then padding (prompts of different lengths)."""
    return (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).float()


def qwen_inputs(C, Dc, B=3, H=12, W=10, L=7, lengths=(7, 4, 5), seed=1):
    """x (B, C, H, W), sigma (B,), context (B, L, Dc) zero where padded, mask (B, L) or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.05
    ctx = torch.randn(B, L, Dc, generator=g)
    mask = None if lengths is None else padding_mask(lengths, L)
    if mask is not None:
        ctx = ctx * mask[..., None]  # the pipeline re-pads with zeros
    return x, sigma, ctx, mask


def qwen21_inputs(C, Dc, B=3, H=6, W=4, L=11, lengths=(11, 7, 9), images=((4, 2), (2, 2)), slots=(1, 5), seed=1):
    """x (B, C, H, W), sigma, context (B, L, Dc), mask (B, L) or None, condition images (tuple of
    (B, C, h, w)), their first slots' positions in the context (tuple of ints)."""
    x, sigma, ctx, mask = qwen_inputs(C, Dc, B, H, W, L, lengths, seed)
    g = torch.Generator().manual_seed(seed + 100)
    imgs = tuple(torch.randn(B, C, h, w, generator=g) for h, w in images)
    return x, sigma, ctx, mask, imgs, tuple(slots)


# ---- the peers in our call convention -----------------------------------------------------------

@torch.no_grad()
def run_qwen(peer, x, sigma, context, mask=None) -> torch.Tensor:
    B, C, H, W = x.shape
    out = peer(hidden_states=peers.pack(x), encoder_hidden_states=context, encoder_hidden_states_mask=mask,
               timestep=sigma, img_shapes=[[(1, H // 2, W // 2)]] * B, return_dict=False)[0]
    return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def img_mask(L: int, B: int, images, slots, target_tokens: int) -> torch.Tensor:
    """diffusers' ``img_mask`` (B, L + N/4): True at each condition image's VLM slots and at the
    target's slots appended after the text (what the 2.1 pipeline builds)."""
    m = torch.zeros(L + target_tokens // 4, dtype=torch.bool)
    for img, start in zip(images, slots):
        m[start:start + img.shape[2] * img.shape[3] // 4] = True
    m[L:] = True
    return m[None].expand(B, -1).clone()


@torch.no_grad()
def run_qwen21(peer, x, sigma, context, mask=None, images=(), slots=()) -> torch.Tensor:
    B, C, H, W = x.shape
    flat = [t.flatten(2).transpose(1, 2) for t in (*images, x)]  # the pipeline's plain flatten
    shapes = [(1, t.shape[2], t.shape[3]) for t in (*images, x)]
    out = peer(hidden_states=torch.cat(flat, 1), encoder_hidden_states=context, timestep=sigma,
               img_shapes=[shapes] * B, img_mask=img_mask(context.shape[1], B, images, slots, H * W),
               encoder_hidden_states_mask=None if mask is None else mask.bool(), return_dict=False)[0]
    return out[:, -H * W:].transpose(1, 2).reshape(B, C, H, W)


def rel(a, b) -> float:
    """max|a - b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(model_or_peer, **kw):
    """Our call's positional args and keywords for a 1.0 or 2.1 model of ours or its peer."""
    c = model_or_peer.config
    if hasattr(c, "family"):  # ours
        fam, C, Dc = c.family, c.latent_channels, c.context_dim
    else:
        fam = family(model_or_peer)
        C, Dc = (c.out_channels, c.joint_attention_dim) if fam == "qwen-image" else (c.in_channels, c.context_in_dim)
    if fam == "qwen-image":
        x, sigma, ctx, mask = qwen_inputs(C, Dc, **kw)
        return (x, sigma, ctx), dict(context_mask=mask)
    x, sigma, ctx, mask, imgs, slots = qwen21_inputs(C, Dc, **kw)
    return (x, sigma, ctx), dict(context_mask=mask, images=imgs, image_slots=slots)


def run_peer(peer, args, kw):
    """The peer's velocity for our call's ``inputs``."""
    if family(peer) == "qwen-image":
        return run_qwen(peer, *args, kw["context_mask"])
    return run_qwen21(peer, *args, kw["context_mask"], kw["images"], kw["image_slots"])


# ---- state dicts in each layout -----------------------------------------------------------

def hidden(peer) -> int:
    return peer.config.num_attention_heads * peer.config.attention_head_dim


def ours_state(peer) -> dict[str, torch.Tensor]:
    """Our (= original) names and tensors of the peer."""
    return keymaps.from_diffusers(peers.diffusers_state(peer), family(peer), hidden(peer))


def original_state(peer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The official / ComfyUI layout: 1.0 diffusers' names, 2.1 with the fused ``gate_up``."""
    return {k: v.contiguous() for k, v in keymaps.to_original(ours_state(peer), prefix).items()}


# Stand-ins for the other parts of ComfyUI's all-in-one files (never loaded by load_transformer).
EXTRAS = {"vae.decoder.conv_in.weight": (8, 16, 3, 3, 3),
          "text_encoders.qwen25_7b.transformer.model.norm.weight": (8,)}


def extras(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in EXTRAS.items()}


def fp8_blocks(sd: dict[str, torch.Tensor], form: str | None, prefix: str = ""):
    """(the file's state dict, the dequantized tensors by our name) with every 2-D block weight in
    float8_e4m3fn, as ComfyUI's fp8 files hold them. form: None (plain fp8, scale 1), "old"
    (``scale_weight`` + a ``scaled_fp8`` marker) or "new" (``weight_scale`` + ``comfy_quant``)."""
    from mmdit import fp8

    out, dequant = {}, {}
    for k, v in sd.items():
        name = k[len(prefix):]
        if not (v.dim() == 2 and name.startswith("transformer_blocks.") and name.endswith(".weight")):
            out[k] = v.to(torch.bfloat16)
            dequant[name] = out[k].float()
            continue
        if form is None:
            q, scale = v.to(torch.float8_e4m3fn), torch.ones(())
        else:
            q, scale = fp8.quantize(v)
        out[k], layer = q, k[:-len(".weight")]
        if form == "old":
            out[layer + ".scale_weight"] = scale.reshape(1)
        elif form == "new":
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
        dequant[name] = q.float() * scale
    if form == "old":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, dequant


def with_weights(peer, ours: dict[str, torch.Tensor]):
    """A copy of the peer holding ``ours`` (our names) as its weights."""
    twin = peers.rounded(peer, torch.float32)
    twin.load_state_dict(keymaps.to_diffusers(ours, family(peer), hidden(peer)))
    return twin


def full_size(name: str):
    """(diffusers state dict on meta, its config dict) of the released transformer, built on meta."""
    cls = getattr(peers.diffusers(), "QwenImageTransformer2DModel" if name == "qwen-image" else "QwenImage21Transformer2DModel")
    with torch.device("meta"):
        peer = cls()
    return dict(peer.state_dict()), dict(peer.config)


# ---- the test checkpoints: head_dim 128, so the RoPE split is read from the shapes as for the released files

LOAD10 = dict(num_layers=2, heads=1, head_dim=128, context_dim=24, latent=4, axes=(16, 56, 56))
LOAD21 = dict(num_layers=2, heads=1, head_dim=128, context_dim=32, latent=8, axes=(16, 56, 56))


def load_peer(fam, seed=0):
    return qwen_peer(**LOAD10, seed=seed) if fam == "qwen-image" else qwen21_peer(**LOAD21, seed=seed)


def write(peer, tmp, how):
    """Write ``peer`` as ``how``; -> (source, our tensors the file holds, after its rounding)."""
    fam = family(peer)
    ours = ours_state(peer)
    if how == "official":  # the released names, one file, nothing else
        return peers.save(original_state(peer), tmp / "model.safetensors"), ours
    if how == "comfy":  # ComfyUI all-in-one: prefix, VAE and text encoder beside
        sd = {**original_state(peer, "model.diffusion_model."), **extras()}
        return peers.save(sd, tmp / "comfy.safetensors"), ours
    if how == "comfy-bf16":
        path = peers.save(original_state(peer, "model.diffusion_model."), tmp / "bf16.safetensors", torch.bfloat16)
        return path, {k: v.to(torch.bfloat16).float() for k, v in ours.items()}
    if how in ("comfy-fp8", "comfy-scaled-old", "comfy-scaled-new"):
        form = {"comfy-fp8": None, "comfy-scaled-old": "old", "comfy-scaled-new": "new"}[how]
        prefix = "" if how == "comfy-scaled-old" else "model.diffusion_model."
        sd, dequant = fp8_blocks(original_state(peer, prefix), form, prefix)
        return peers.save(sd, tmp / f"{how}.safetensors"), dequant
    if how == "comfy-split":  # 2.1 with diffusers' split SwiGLU names under the prefix
        sd = {"model.diffusion_model." + k: v for k, v in peers.diffusers_state(peer).items()}
        return peers.save(sd, tmp / "split.safetensors"), ours
    if how == "diffusers-sharded":
        folder = tmp / "pipe"
        peer.save_pretrained(str(folder / "transformer"), safe_serialization=True, max_shard_size="300KB")
        assert len(list((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "QwenImagePipeline" if fam == "qwen-image" else "QwenImage21Pipeline",
             "transformer": ["diffusers", type(peer).__name__]}))
        return folder, ours
    raise ValueError(how)
