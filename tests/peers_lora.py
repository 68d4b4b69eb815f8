"""LoRA files laid out exactly as each trainer or tool writes them, for the tests (test-only).

Each writer follows the tool's own saving code (read with the search tools; none of it copied):

  onetrainer_flux   OneTrainer's FLUX LoRA (modules/util/convert/lora/convert_flux_lora.py, its
                    "legacy diffusers" key set): ``lora_transformer_<diffusers module, . as _>``
                    + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; CLIP-L as ``lora_te1_``
  lycoris_flux      LyCORIS ``algo=lora`` as SimpleTuner saves it (lycoris/wrapper.py, modules/locon.py):
                    ``lycoris_<module path, . as _>`` + ``lora_down/lora_up.weight`` + ``alpha``, for
                    every Linear inside the block classes of its FLUX preset
  peft_folder       PEFT ``get_peft_model(...).save_pretrained(folder)`` itself
  comfy_extracted   ComfyUI's LoraSave (comfy_extras/nodes_lora_extract.py, ``lora_type="standard"``,
                    ``bias_diff=True``, its defaults): ``diffusion_model.<key>`` + ``lora_up.weight`` =
                    U S (clamped at the 0.99 quantile), ``lora_down.weight`` = V^T (a conv: up
                    (out, r, 1, 1), down (r, in, kh, kw)), fp16, no alpha; 1-D weights as ``.diff``,
                    biases as ``.diff_b``
  kohya_conv        kohya sd-scripts lora_sd3.py with ``emb_dims``: ``lora_unet_x_embedder_proj`` as a
                    conv LoRA (down Conv2d(in, r, k, stride k), up Conv2d(r, out, 1)) + ``.alpha``
  bfl_control       BFL's FLUX.1 Depth / Canny Control LoRA (what diffusers'
                    ``_convert_bfl_flux_control_lora_to_diffusers`` reads): BFL names + ``lora_A`` /
                    ``lora_B`` (+ ``lora_B.bias``), ``img_in`` twice as wide, full q/k norm scales
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path

import torch

from mmdit.weights import keymaps

import peers

CLAMP_QUANTILE = 0.99  # ComfyUI's LoraSave clamps U S and V^T at this quantile of their values


def rand(shape, g, std=0.05):
    return torch.randn(shape, generator=g) * std


def flux_linears(peer, within=("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                                "time_text_embed.", "norm_out.", "proj_out")):
    return [(n, m) for n, m in peer.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(within)]


def to_ours(deltas: dict[str, torch.Tensor], peer) -> dict[str, torch.Tensor]:
    """{diffusers module: delta} -> {our module: delta} through the key map (q / k / v rows joined;
    a fused layer's parts the LoRA leaves out count as zero)."""
    sd = {f"{k}.weight": v for k, v in deltas.items()}
    _, _, missing = keymaps.plan_from_diffusers(sd, peers.family(peer))
    shapes = {f"{n}.weight": m.weight.shape for n, m in peer.named_modules() if isinstance(m, torch.nn.Linear)}
    sd.update({k: torch.zeros(shapes[k]) for k in missing})
    ours = keymaps.from_diffusers(sd, peers.family(peer), peers.hidden(peer))
    return {k[:-len(".weight")]: v for k, v in ours.items()}


def _underscored(peer, prefix, rank, alpha, seed, modules):
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for n, m in modules:
        key = prefix + n.replace(".", "_")
        down, up = rand((rank, m.in_features), g), rand((m.out_features, rank), g)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        deltas[n] = alpha / rank * up @ down
    return sd, to_ours(deltas, peer)


def onetrainer_flux(peer, rank=4, alpha=2.0, seed=3, only=None):
    """(file, {our module: alpha / rank * up @ down}); ``only`` keeps the module names it accepts."""
    modules = [(n, m) for n, m in flux_linears(peer) if only is None or only(n)]
    return _underscored(peer, "lora_transformer_", rank, alpha, seed, modules)


def lycoris_flux(peer, rank=4, alpha=8.0, seed=4):
    """LyCORIS names every Linear inside FluxTransformerBlock / FluxSingleTransformerBlock
    (``lycoris_<block>_<child>``); alpha is a float buffer beside each pair."""
    blocks = [n for n, m in peer.named_modules() if type(m).__name__ in ("FluxTransformerBlock",
                                                                         "FluxSingleTransformerBlock")]
    modules = [(n, m) for n, m in peer.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.startswith(b + ".") for b in blocks)]
    return _underscored(peer, "lycoris_", rank, alpha, seed, modules)


def lycoris_kron_hada(peer, algo: str, rank=4, alpha=2.0, factor=4, seed=5):
    """LyCORIS ``algo=lokr`` / ``algo=loha`` over the same modules as ``lycoris_flux``: LoKr keeps
    ``lokr_w1`` (out/b, in/d) whole (``factor`` rows / columns) and ``lokr_w2`` as ``lokr_w2_a`` @
    ``lokr_w2_b`` at ``rank``; LoHa has ``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b``.
    Returns (file, {our module: the full delta at strength 1})."""
    g = torch.Generator().manual_seed(seed)
    blocks = [n for n, m in peer.named_modules() if type(m).__name__ in ("FluxTransformerBlock",
                                                                         "FluxSingleTransformerBlock")]
    sd, deltas = {}, {}
    for n, m in peer.named_modules():
        if not (isinstance(m, torch.nn.Linear) and any(n.startswith(b + ".") for b in blocks)):
            continue
        key, out, n_in = "lycoris_" + n.replace(".", "_"), m.out_features, m.in_features
        if algo == "lokr":
            w1 = rand((factor, factor), g, 0.5)
            w2a, w2b = rand((out // factor, rank), g, 0.2), rand((rank, n_in // factor), g, 0.2)
            sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b})
            deltas[n] = alpha / rank * torch.kron(w1, w2a @ w2b)
        else:
            w = [rand(s, g, 0.2) for s in ((out, rank), (rank, n_in), (out, rank), (rank, n_in))]
            sd.update(dict(zip([f"{key}.hada_w1_a", f"{key}.hada_w1_b", f"{key}.hada_w2_a", f"{key}.hada_w2_b"], w)))
            deltas[n] = alpha / rank * (w[0] @ w[1]) * (w[2] @ w[3])
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd, to_ours(deltas, peer)


FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder",
                "norm_out.linear"]


def peft_folder(peer, folder: Path, seed=6, **config):
    """PEFT's own: ``get_peft_model`` on a copy of the peer, random ``lora_B`` (PEFT starts them at
    zero), ``save_pretrained``. Returns (the PEFT-wrapped copy, {our module: PEFT's delta})."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(peer), LoraConfig(target_modules=FLUX_TARGETS, **config))
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for n, m in wrapped.base_model.model.named_modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(rand(m.lora_B["default"].weight.shape, g))
                deltas[n] = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
    wrapped.save_pretrained(str(folder))
    return wrapped.base_model.model, to_ours(deltas, peer)


def _low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's extraction of one weight difference: (up, down), convs reshaped to kernels."""
    conv = diff.dim() == 4
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    flat = diff.flatten(1) if conv else diff
    u, s, vh = torch.linalg.svd(flat.float())
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), CLAMP_QUANTILE)
    up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if conv:
        up, down = up.reshape(out_dim, rank, 1, 1), down.reshape(rank, in_dim, *diff.shape[2:])
    return up, down


def comfy_extracted(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int = 4):
    """LoraSave's file for the difference ``tuned - base`` (ComfyUI's own names = ours), and the
    state dict it stands for (``base`` + every delta, as ComfyUI applies the file at strength 1)."""
    out, merged = {}, {k: v.clone() for k, v in base.items()}
    for k, w in base.items():
        diff = tuned[k] - w
        if k.endswith(".weight") and diff.dim() < 2:
            out[f"diffusion_model.{k[:-len('.weight')]}.diff"] = diff.half()
            merged[k] = w + diff.half().float()
        elif k.endswith(".weight"):
            up, down = _low_rank(diff, rank)
            stem = f"diffusion_model.{k[:-len('.weight')]}"
            out[f"{stem}.lora_up.weight"], out[f"{stem}.lora_down.weight"] = up.half(), down.half()
            merged[k] = w + (up.half().float().flatten(1) @ down.half().float().flatten(1)).view(w.shape)
        elif k.endswith(".bias"):
            out[f"diffusion_model.{k[:-len('.bias')]}.diff_b"] = diff.half()
            merged[k] = w + diff.half().float()
    return {k: v.contiguous() for k, v in out.items()}, merged


def tuned(sd: dict[str, torch.Tensor], seed=8, std=0.02):
    """``sd`` plus a random low-rank-ish change to every tensor (a fine-tune to extract from)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * std for k, v in sd.items()}


def kohya_conv(rank=4, alpha=2.0, hidden=128, in_channels=16, patch=2, seed=9):
    """kohya's x_embedder LoRA (``emb_dims``): (file, our x_embedder.proj delta)."""
    g = torch.Generator().manual_seed(seed)
    down, up = rand((rank, in_channels, patch, patch), g), rand((hidden, rank, 1, 1), g)
    sd = {"lora_unet_x_embedder_proj.lora_down.weight": down, "lora_unet_x_embedder_proj.lora_up.weight": up,
          "lora_unet_x_embedder_proj.alpha": torch.tensor(alpha)}
    return sd, alpha / rank * (up.flatten(1) @ down.flatten(1)).view(hidden, in_channels, patch, patch)


def bfl_control(model, rank=4, seed=10):
    """A Control LoRA over our (BFL) names: every Linear as lora_A / lora_B (+ lora_B.bias),
    ``img_in`` with twice the input channels, and full q / k norm scales."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            n_in = 2 * m.in_features if n == "img_in" else m.in_features
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = rand((rank, n_in), g), rand((m.out_features, rank), g)
            sd[f"{n}.lora_B.bias"] = rand((m.out_features,), g)
        elif n.endswith(("query_norm", "key_norm")):
            sd[f"{n}.scale"] = 1 + rand(m.scale.shape, g)
    return sd


@functools.lru_cache(maxsize=None)
def kohya_flux_converter(hidden: int, mlp: int):
    """diffusers' kohya FLUX converter hard-codes the FLUX.1 widths for ``linear1``; recompile its
    own source with the test model's (as peers does for the checkpoint converter)."""
    peers.diffusers()
    from diffusers.loaders import lora_conversion_utils as lcu

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    old = "dims=[3072, 3072, 3072, 12288]"
    assert src.count(old) == 1, "diffusers changed its kohya FLUX converter; update this shim"
    namespace = dict(vars(lcu))
    exec(compile(src.replace(old, f"dims=[{hidden}, {hidden}, {hidden}, {mlp}]"), lcu.__file__, "exec"), namespace)
    return namespace["_convert_kohya_flux_lora_to_diffusers"]


def diffusers_reads(peer, sd: dict[str, torch.Tensor], scale: float, converter=None):
    """A copy of the peer with ``sd`` loaded by diffusers (``converter`` first, e.g. its kohya or
    OneTrainer reader) at ``scale``."""
    twin = peers.rounded(peer, torch.float32)
    sd = {k: v.clone() for k, v in sd.items()}
    if converter is not None:
        sd = converter(sd)
    twin.load_lora_adapter(sd, prefix="transformer", adapter_name="x")
    twin.set_adapters(["x"], weights=[scale])
    return twin


@functools.lru_cache(maxsize=None)
def bfl_control_converter(num_double: int, num_single: int, hidden: int):
    """diffusers' BFL Control LoRA converter hard-codes FLUX.1's 19 + 38 blocks and width 3072;
    recompile its own source with the test model's."""
    peers.diffusers()
    from diffusers.loaders import lora_conversion_utils as lcu

    src = inspect.getsource(lcu._convert_bfl_flux_control_lora_to_diffusers)
    for old, new in (("num_layers = 19", f"num_layers = {num_double}"),
                     ("num_single_layers = 38", f"num_single_layers = {num_single}"),
                     ("inner_dim = 3072", f"inner_dim = {hidden}")):
        assert src.count(old) == 1, "diffusers changed its Control LoRA converter; update this shim"
        src = src.replace(old, new)
    namespace = dict(vars(lcu))
    exec(compile(src, lcu.__file__, "exec"), namespace)
    return namespace["_convert_bfl_flux_control_lora_to_diffusers"]


def diffusers_control(peer, sd: dict[str, torch.Tensor], scale: float):
    """A copy of the peer after diffusers' ``FluxControlPipeline.load_lora_weights`` (the FLUX LoRA
    mixin on a holder of the transformer alone): x_embedder widened, norms replaced, LoRA at ``scale``."""
    peers.diffusers()
    from diffusers.loaders import FluxLoraLoaderMixin
    from diffusers.loaders import lora_pipeline

    class Holder(FluxLoraLoaderMixin):
        hf_device_map = None  # what a pipeline that is not device-mapped says

        def __init__(self, transformer):
            self.transformer, self.text_encoder, self.components = transformer, None, {"transformer": transformer}

    twin = peers.rounded(peer, torch.float32)
    cfg = peer.config
    original = lora_pipeline._convert_bfl_flux_control_lora_to_diffusers
    lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = bfl_control_converter(
        cfg.num_layers, cfg.num_single_layers, peers.hidden(peer))
    try:
        Holder(twin).load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="x")
    finally:
        lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = original
    twin.set_adapters(["x"], weights=[scale])
    return twin


@torch.no_grad()
def run_control(peer, x, control, sigma, context, pooled, guidance):
    """The peer's velocity for latents ``x`` (B, 16, H, W) with the control latents beside them, as
    FluxControlPipeline packs them (latent tokens, then control tokens, along the features)."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    out = peer(hidden_states=torch.cat([peers.pack(x), peers.pack(control)], -1), timestep=sigma, guidance=guidance,
               encoder_hidden_states=context, pooled_projections=pooled, img_ids=ids.reshape(-1, 3),
               txt_ids=torch.zeros(context.shape[1], 3), return_dict=False)[0]
    return out.view(B, h, w, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
