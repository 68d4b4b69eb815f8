"""Qwen-Image 1.0 and 2.1: parity with diffusers' transformers in every checkpoint layout, the
text padding mask, condition images, DG's fork and the SLG / PAG branches, one graph, key maps, fp8.

Peers are ``QwenImageTransformer2DModel`` / ``QwenImage21Transformer2DModel`` with random weights
(tests/peers_qwen.py), run in our call convention. Batches hold prompts of different lengths
(right padding, as the pipelines pad) and, for 2.1, two condition images inside the text.
"""
import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import mmdit
from mmdit.branches import Branch, IdentityAttention, MADisruption, SkipLayers
from mmdit.cli import main as cli_main
from mmdit.models.rows import BlockRows
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect
from mmdit.weights.transformer import load_transformer

import peers
import peers_qwen as pq

TOL = 1e-5  # fp32 parity with diffusers, max|ours - peer| / max|peer| (measured ~2e-7)
SAME = 1e-5  # the same computation by two paths of ours (fork vs separate forward)
EFFECT = 1e-3  # a mask / perturbation must change the output at least this much
FP8_ROUNDING = 0.2  # fp8 weights in memory vs the full-precision output (e4m3: ~3% per weight)

# head_dim 128: the RoPE split is read from the shapes, as for the released files
LOAD10 = dict(num_layers=2, heads=1, head_dim=128, context_dim=24, latent=4, axes=(16, 56, 56))
LOAD21 = dict(num_layers=2, heads=1, head_dim=128, context_dim=32, latent=8, axes=(16, 56, 56))
TINY = {"qwen-image": dict(num_layers=3, num_heads=2, head_dim=16, context_dim=24, in_channels=16,
                           axes_dim=(8, 4, 4)),
        "qwen-image-2.1": dict(num_layers=3, num_heads=2, head_dim=16, context_dim=32, in_channels=8,
                               axes_dim=(4, 6, 6))}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(model_or_peer, **kw):
    """Our call's positional args and keywords for a 1.0 or 2.1 model of ours or its peer."""
    c = model_or_peer.config
    if hasattr(c, "family"):  # ours
        fam, C, Dc = c.family, c.latent_channels, c.context_dim
    else:
        fam = pq.family(model_or_peer)
        C, Dc = (c.out_channels, c.joint_attention_dim) if fam == "qwen-image" else (c.in_channels, c.context_in_dim)
    if fam == "qwen-image":
        x, sigma, ctx, mask = pq.qwen_inputs(C, Dc, **kw)
        return (x, sigma, ctx), dict(context_mask=mask)
    x, sigma, ctx, mask, imgs, slots = pq.qwen21_inputs(C, Dc, **kw)
    return (x, sigma, ctx), dict(context_mask=mask, images=imgs, image_slots=slots)


def run_peer(peer, args, kw):
    if pq.family(peer) == "qwen-image":
        return pq.run_qwen(peer, *args, kw["context_mask"])
    return pq.run_qwen21(peer, *args, kw["context_mask"], kw["images"], kw["image_slots"])


def tiny(name, seed=0, **extra):
    torch.manual_seed(seed)
    model = mmdit.build_transformer(name, **{**TINY[name], **extra}).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero / one inits would hide wiring mistakes
            p.normal_(0, 0.1)
    return model


# ---- every layout against diffusers ---------------------------------------------------------

def write(peer, tmp, how):
    """Write ``peer`` as ``how``; -> (source, our tensors the file holds, after its rounding)."""
    fam = pq.family(peer)
    ours = pq.ours_state(peer)
    if how == "official":  # the released names, one file, nothing else
        return peers.save(pq.original_state(peer), tmp / "model.safetensors"), ours
    if how == "comfy":  # ComfyUI all-in-one: prefix, VAE and text encoder beside
        sd = {**pq.original_state(peer, "model.diffusion_model."), **pq.extras()}
        return peers.save(sd, tmp / "comfy.safetensors"), ours
    if how == "comfy-bf16":
        path = peers.save(pq.original_state(peer, "model.diffusion_model."), tmp / "bf16.safetensors", torch.bfloat16)
        return path, {k: v.to(torch.bfloat16).float() for k, v in ours.items()}
    if how in ("comfy-fp8", "comfy-scaled-old", "comfy-scaled-new"):
        form = {"comfy-fp8": None, "comfy-scaled-old": "old", "comfy-scaled-new": "new"}[how]
        prefix = "" if how == "comfy-scaled-old" else "model.diffusion_model."
        sd, dequant = pq.fp8_blocks(pq.original_state(peer, prefix), form, prefix)
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


LAYOUTS = {  # id: (family, how)
    "1.0-official": ("qwen-image", "official"), "1.0-comfy-prefixed": ("qwen-image", "comfy"),
    "1.0-comfy-bf16": ("qwen-image", "comfy-bf16"), "1.0-comfy-fp8": ("qwen-image", "comfy-fp8"),
    "1.0-comfy-scaled-fp8-old": ("qwen-image", "comfy-scaled-old"),
    "1.0-comfy-scaled-fp8-new": ("qwen-image", "comfy-scaled-new"),
    "1.0-diffusers-sharded": ("qwen-image", "diffusers-sharded"),
    "2.1-original-fused": ("qwen-image-2.1", "official"), "2.1-comfy-prefixed": ("qwen-image-2.1", "comfy"),
    "2.1-comfy-split": ("qwen-image-2.1", "comfy-split"),
    "2.1-comfy-scaled-fp8-new": ("qwen-image-2.1", "comfy-scaled-new"),
    "2.1-diffusers-sharded": ("qwen-image-2.1", "diffusers-sharded"),
}


def load_peer(fam, seed=0):
    return pq.qwen_peer(**LOAD10, seed=seed) if fam == "qwen-image" else pq.qwen21_peer(**LOAD21, seed=seed)


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_every_layout_loads_and_matches_diffusers(case, tmp_path):
    fam, how = LAYOUTS[case]
    peer = load_peer(fam)
    source, held = write(peer, tmp_path, how)
    model = load_transformer(source)
    assert model.config.family == fam and all(p.dtype == torch.float32 for p in model.state_dict().values())
    reference = pq.with_weights(peer, held)
    args, kw = inputs(peer)
    with torch.no_grad():
        got = model(*args, **kw)
    err = rel(got, run_peer(reference, args, kw))
    print(f"\n{case}: {model.detected.layout}, prefix {model.detected.prefix!r}, config from "
          f"{model.detected.config_source}: max rel err {err:.2e}")
    assert got.shape == args[0].shape and err <= TOL


def test_hub_ids_load_through_the_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fam, repo in (("qwen-image", "Qwen/Qwen-Image"), ("qwen-image-2.1", "Qwen/Qwen-Image-2.1")):
        peer = load_peer(fam, seed=3)
        folder, _ = write(peer, tmp_path / fam, "diffusers-sharded")
        files = {str(p.relative_to(folder)): p for p in (folder / "transformer").iterdir()}
        peers.fake_hub_cache(cache, repo, {**files, "model_index.json": folder / "model_index.json"},
                             not_downloaded=("vae/diffusion_pytorch_model.safetensors",))
        model = load_transformer(repo)
        args, kw = inputs(peer)
        with torch.no_grad():
            assert rel(model(*args, **kw), run_peer(peer, args, kw)) <= TOL
        assert model.detected.config_source == "config.json"


def test_padding_mask_batches_prompts_like_alone_and_does_something():
    """1.0: a padded row equals its prompt alone without padding (text positions don't move)."""
    model = tiny("qwen-image")
    (x, sigma, ctx), kw = inputs(model, lengths=(7, 4, 5))
    with torch.no_grad():
        batched = model(x, sigma, ctx, **kw)
        alone = model(x[1:2], sigma[1:2], ctx[1:2, :4])
        unmasked = model(x, sigma, ctx)
    assert rel(batched[1:2], alone) <= SAME
    assert rel(unmasked[1:], batched[1:]) >= EFFECT  # the padded keys would change it


def test_21_mask_images_and_causal_condition_matter():
    model = tiny("qwen-image-2.1")
    (x, sigma, ctx), kw = inputs(model)
    with torch.no_grad():
        out = model(x, sigma, ctx, **kw)
        assert rel(model(x, sigma, ctx, images=kw["images"], image_slots=kw["image_slots"])[1:], out[1:]) >= EFFECT
        other = tuple(i.flip(0) for i in kw["images"])
        assert rel(model(x, sigma, ctx, **{**kw, "images": other}), out) >= EFFECT
    peer = pq.qwen21_peer(causal_condition=False)
    ours = mmdit.build_transformer("qwen-image-2.1", num_layers=2, num_heads=2, head_dim=16, context_dim=32,
                                   in_channels=8, axes_dim=(4, 6, 6), causal_condition=False)
    ours.load_state_dict(pq.ours_state(peer))
    args, kw = inputs(peer)
    with torch.no_grad():
        assert rel(ours(*args, **kw), run_peer(peer, args, kw)) <= TOL


def test_bad_inputs_are_clear_errors():
    model = tiny("qwen-image")
    (x, sigma, ctx), kw = inputs(model)
    with pytest.raises(ValueError, match="must be even"):
        model(x[:, :, :11], sigma, ctx)
    with pytest.raises(ValueError, match=r"context \(B, L, 24\)"):
        model(x, sigma, torch.randn(3, 7, 40))
    with pytest.raises(ValueError, match=r"context_mask must be \(3, 7\)"):
        model(x, sigma, ctx, context_mask=torch.ones(3, 5))
    model = tiny("qwen-image-2.1")
    (x, sigma, ctx), kw = inputs(model)
    with pytest.raises(ValueError, match="2 condition images but 1 image_slots"):
        model(x, sigma, ctx, images=kw["images"], image_slots=(1,))
    with pytest.raises(ValueError, match="must follow the previous image's"):
        model(x, sigma, ctx, images=kw["images"], image_slots=(1, 2))
    with pytest.raises(ValueError, match="h\\*w a multiple of 4"):
        model(x, sigma, ctx, images=(torch.randn(3, 8, 3, 3),), image_slots=(0,))


# ---- the DG fork and the perturbed branches ---------------------------------------------

@pytest.mark.parametrize("name,block,streams", [("qwen-image", 1, ("image",)), ("qwen-image", 2, ("image", "text")),
                                                ("qwen-image-2.1", 1, ("image",)),
                                                ("qwen-image-2.1", 0, ("image", "text")),
                                                ("qwen-image-2.1", 1, ("text",))])  # the prefix after the last block feeds nothing
def test_fork_equals_a_separate_disrupted_forward(name, block, streams):
    model = tiny(name)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=block, rho=lambda s: 0.5 * s, streams=streams)
    args, kw = inputs(model)
    with torch.no_grad():
        plain = model(*args, **kw)
        forked = model(*args, **kw, fork=slice(1, 3))
        disrupted = model(*args, **kw, disrupt=slice(0, 3))
    assert forked.shape[0] == 5
    assert rel(forked[:3], plain) <= SAME and rel(forked[3:], disrupted[1:3]) <= SAME
    assert rel(disrupted, plain) >= EFFECT


def skipped(model, layers):
    """A copy whose listed blocks return their inputs."""
    model = copy.deepcopy(model)
    for i in layers:
        model.transformer_blocks[i].forward = lambda a, b, *rest, rows=None: (a, b)
    return model


def identity_everywhere(model, layers, rows):
    """A copy whose listed blocks give all ``rows`` rows PAG's identity image attention."""
    model = copy.deepcopy(model)
    for i in layers:
        original = model.transformer_blocks[i].forward
        model.transformer_blocks[i].forward = lambda *a, original=original, **k: original(*a, rows=BlockRows(((0, rows),)))
    return model


def source_rows(v, src):
    if isinstance(v, tuple):
        return tuple(source_rows(t, src) for t in v)
    return v[src] if torch.is_tensor(v) else v


@pytest.mark.parametrize("name", list(TINY))
def test_slg_and_pag_branches_equal_separate_perturbed_forwards(name):
    model = tiny(name)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    args, kw = inputs(model)
    src = slice(1, 3)
    sub_args, sub_kw = [source_rows(a, src) for a in args], {k: source_rows(v, src) for k, v in kw.items()}
    for layers in [(0,), (1, 2)]:
        branches = (Branch(src, SkipLayers(layers)), Branch(src, IdentityAttention(layers)))
        with torch.no_grad():
            out = model(*args, **kw, branches=branches)
            plain = model(*args, **kw)
            skip_ref = skipped(model, layers)(*sub_args, **sub_kw)
            pag_ref = identity_everywhere(model, layers, 2)(*sub_args, **sub_kw)
            all_in_one = model(*args, **kw, fork=src, branches=branches)
            dg_alone = model(*args, **kw, fork=src)
        assert out.shape[0] == 7 and rel(out[:3], plain) <= SAME
        assert rel(out[3:5], skip_ref) <= SAME and rel(out[5:7], pag_ref) <= SAME, layers
        assert rel(out[3:5], plain[src]) >= EFFECT and rel(out[5:7], plain[src]) >= EFFECT
        assert rel(all_in_one[:5], dg_alone) <= SAME and rel(all_in_one[5:], out[3:]) <= SAME


# ---- one graph --------------------------------------------------------------------------

ROWS = {"plain": {}, "dg_slg_pag": {"fork": slice(2, 3), "branches": (Branch(slice(2, 3), SkipLayers((0,))),
                                                                      Branch(slice(2, 3), IdentityAttention((1,))))}}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("name", list(TINY))
def test_forward_is_one_graph(name, rows):
    """Without and with the DG fork and the SLG / PAG branches (2.1: with condition images and padding)."""
    model = tiny(name, num_layers=2)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1, rho=lambda s: 0.5 * s)
    args, kw = inputs(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args, **kw, **ROWS[rows])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


SMALL_INPUTS = {"qwen-image": dict(B=2, H=4, W=4, L=3, lengths=(3, 2)),
                "qwen-image-2.1": dict(B=2, H=2, W=2, L=5, lengths=(5, 4), images=((2, 2),), slots=(1,))}


@pytest.mark.parametrize("name", list(TINY))
def test_triton_kernels_give_the_torch_path(name, monkeypatch):
    """The fused kernels (interpreted on the CPU) with Qwen's inputs: 2.1's shift-less modulation
    (a stride-0 zero shift), tanh gates, the fork at the first block."""
    model = tiny(name, num_layers=2)
    model.ma = mmdit.MASpec(channels=(3, 17), block=0, rho=0.5, streams=("image", "text"))
    args, kw = inputs(model, **SMALL_INPUTS[name])
    with torch.no_grad():
        want = model(*args, **kw, fork=slice(1, 2))
        monkeypatch.setenv("MMDIT_KERNELS", "triton")
        got = model(*args, **kw, fork=slice(1, 2))
    assert rel(got, want) <= SAME


# ---- key maps, detection, inspect -----------------------------------------------------------

COUNTS = {"qwen-image": (1933, 1933), "qwen-image-2.1": (265, 297)}  # tensors: ours (= original), diffusers


@pytest.mark.parametrize("name", list(COUNTS))
def test_full_size_key_maps_and_detection(name):
    dsd, config_json = pq.full_size(name)
    cfg = mmdit.preset(name)
    ours = keymaps.from_diffusers(dsd, cfg.family, cfg.hidden_size)
    model = mmdit.build_transformer(name, device="meta")
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(ours) == shapes(model.state_dict())
    assert shapes(keymaps.to_diffusers(ours, cfg.family, cfg.hidden_size)) == shapes(dsd)
    assert (len(ours), len(dsd)) == COUNTS[name]
    cls = "QwenImageTransformer2DModel" if name == "qwen-image" else "QwenImage21Transformer2DModel"
    for sd, json_ in ((keymaps.to_original(ours, "model.diffusion_model."), None), (dsd, None),
                      (dsd, {**config_json, "_class_name": cls})):
        det = detect(shapes(sd), json_)
        assert (det.family, det.preset) == (name, name), det
    if name == "qwen-image-2.1":  # diffusers' own converter reads our original layout
        from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers as conv

        assert shapes(conv(keymaps.to_original(ours, "model.diffusion_model."))) == shapes(dsd)


@pytest.mark.parametrize("make", [pq.qwen_peer, pq.qwen21_peer], ids=["1.0", "2.1"])
def test_key_maps_round_trip_exactly_both_ways(make):
    peer = make()
    fam, h = pq.family(peer), pq.hidden(peer)
    dsd = peers.diffusers_state(peer)
    ours = keymaps.from_diffusers(dsd, fam, h)
    back = keymaps.to_diffusers(ours, fam, h)
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    again = keymaps.from_diffusers(back, fam, h)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    if fam == "qwen-image-2.1":
        from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers as conv

        converted = conv(keymaps.to_original(ours, "model.diffusion_model."))
        assert converted.keys() == dsd.keys() and all(torch.equal(converted[k], dsd[k]) for k in dsd)


def test_markers_are_qwen_only_and_every_family_is_still_told_apart():
    """Qwen's markers are names of no other family; detection by key counts still names every
    official checkpoint's family (FLUX's marker ``img_in.weight`` is a Qwen name too)."""
    from mmdit.weights.families import FAMILIES

    for fam in ("qwen-image", "qwen-image-2.1"):
        for layout, marker in FAMILIES[fam].MARKERS.items():
            others = [(f, lay) for f in FAMILIES for lay in ("original", "diffusers")
                      if f != fam and keymaps.known(marker, lay, f)]
            assert keymaps.known(marker, layout, fam) and not others, (marker, others)
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    for name in ["flux.1-dev", *COUNTS]:
        dsd = (peers.full_size if name in peers.FULL else pq.full_size)(name)[0]
        fam = mmdit.preset(name).family
        ours = keymaps.from_diffusers(dsd, fam, mmdit.preset(name).hidden_size)
        for sd in (dsd, keymaps.to_original(ours, "model.diffusion_model."), ours):
            assert detect(shapes(sd)).preset == name


def test_inspect_names_both(tmp_path, capsys):
    for fam in ("qwen-image", "qwen-image-2.1"):
        path, _ = write(load_peer(fam), tmp_path / fam, "comfy")
        assert cli_main(["inspect", str(path)]) in (None, 0)
        out = capsys.readouterr().out
        name = "Qwen-Image 1.0" if fam == "qwen-image" else "Qwen-Image 2.1"
        assert re.search(rf"family: +{name}\n", out) and "prefix 'model.diffusion_model.'" in out, out
        assert re.search(r"also in file: +text_encoders.qwen25_7b \(1 tensors\), vae \(1 tensors\)", out), out


def test_variants_this_loader_does_not_implement_are_named(tmp_path):
    peer = load_peer("qwen-image")
    folder, _ = write(peer, tmp_path, "diffusers-sharded")
    cfg_path = folder / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "zero_cond_t": True}))
    with pytest.raises(CheckpointError, match="zero_cond_t.*Edit-2511"):
        load_transformer(folder)


# ---- fp8 weights in memory --------------------------------------------------------------

@pytest.mark.parametrize("fam", ["qwen-image", "qwen-image-2.1"])
def test_fp8_weights_in_memory_are_close_to_the_dequantized_reference(fam, tmp_path):
    peer = load_peer(fam)
    path, _ = write(peer, tmp_path, "official")
    full, kept = load_transformer(path), load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    from mmdit import fp8

    swapped = [n for n, m in kept.named_modules() if isinstance(m, fp8.FP8Linear)]
    assert swapped and not any(n.startswith(("proj_out", "norm_out")) for n in swapped)
    dequant = {k: v.float() * kept.state_dict()[k[:-len("weight")] + "weight_scale"]
               if v.dtype == torch.float8_e4m3fn else v for k, v in kept.state_dict().items()
               if not k.endswith("weight_scale")}
    args, kw = inputs(peer)
    with torch.no_grad():
        got = kept(*args, **kw)
        assert rel(got, run_peer(pq.with_weights(peer, dequant), args, kw)) <= 1e-4  # exact up to fp32
        assert rel(got, full(*args, **kw)) <= FP8_ROUNDING
    scaled, _ = write(peer, tmp_path, "comfy-scaled-new")  # an fp8 file keeps its bytes and scales
    kept = load_transformer(scaled, weight_dtype=torch.float8_e4m3fn)
    assert isinstance(kept.transformer_blocks[0].attn.to_q, fp8.FP8Linear)


# ---- LoRA in the formats people train for Qwen-Image -------------------------------------

LORA_TARGETS = {
    "qwen-image": ["transformer_blocks.{}.attn.to_q", "transformer_blocks.{}.attn.add_k_proj",
                   "transformer_blocks.{}.attn.to_out.0", "transformer_blocks.{}.attn.to_add_out",
                   "transformer_blocks.{}.img_mlp.net.0.proj", "transformer_blocks.{}.txt_mlp.net.2",
                   "transformer_blocks.{}.img_mod.1", "img_in", "norm_out.linear"],
    "qwen-image-2.1": ["transformer_blocks.{}.attn.to_k", "transformer_blocks.{}.attn.to_out.0",
                       "transformer_blocks.{}.img_mlp.gate_layer", "transformer_blocks.{}.img_mlp.proj",
                       "transformer_blocks.{}.img_mlp.out", "txt_in.in_layer", "modulation.1"],
}


def lora_pairs(peer, rank=4, seed=5):
    """diffusers module name -> (down (r, in), up (out, r), alpha) for the targets of every block."""
    g = torch.Generator().manual_seed(seed)
    names = [t.format(i) for t in LORA_TARGETS[pq.family(peer)]
             for i in range(peer.config.num_layers if "{}" in t else 1)]
    out = {}
    for j, n in enumerate(dict.fromkeys(names)):
        m = peer.get_submodule(n)
        r = rank + j % 2
        out[n] = (torch.randn(r, m.in_features, generator=g) * 0.05, torch.randn(m.out_features, r, generator=g) * 0.05,
                  r / 2)
    return out


def lora_file(pairs, style):
    """The pairs as a LoRA state dict in one producer's key layout (notes: Qwen-Image LoRA formats)."""
    sd = {}
    for n, (down, up, alpha) in pairs.items():
        flat = n.replace(".", "_")
        key, (dk, uk), with_alpha = {
            "diffusers": ("transformer." + n, (".lora_A.weight", ".lora_B.weight"), False),
            "comfy": ("diffusion_model." + n, (".lora_A.weight", ".lora_B.weight"), False),  # ai-toolkit too
            "kohya": ("lora_unet_" + flat, (".lora_down.weight", ".lora_up.weight"), True),  # musubi-tuner
            "lightning": (n, (".lora_down.weight", ".lora_up.weight"), True),  # lightx2v, unprefixed
            "diffsynth": (n, (".lora_A.default.weight", ".lora_B.default.weight"), False),
            "lycoris": ("lycoris_" + flat, (".lora_down.weight", ".lora_up.weight"), True),
        }[style]
        sd[key + dk], sd[key + uk] = down.clone(), up.clone()
        if with_alpha:
            sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


def merged_peer(peer, pairs, style, scale):
    """The peer with ``W += scale * (alpha / rank if the format stores alpha) * up @ down``."""
    twin = peers.rounded(peer, torch.float32)
    with torch.no_grad():
        for n, (down, up, alpha) in pairs.items():
            a = alpha / down.shape[0] if style in ("kohya", "lightning", "lycoris") else 1.0
            twin.get_submodule(n).weight += scale * a * up @ down
    return twin


def diffusers_loaded(peer, sd, scale):
    """The peer with the LoRA file loaded by diffusers (QwenImage's converter, then PEFT)."""
    from diffusers import QwenImagePipeline

    twin = peers.rounded(peer, torch.float32)
    converted = QwenImagePipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    twin.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
    twin.set_adapters(["x"], weights=[scale])
    return twin


STYLES = ["diffusers", "comfy", "kohya", "lightning", "diffsynth", "lycoris"]
DIFFUSERS_READS = {"diffusers", "comfy", "kohya", "lightning", "diffsynth"}  # lycoris: ComfyUI only


@pytest.mark.parametrize("fam", ["qwen-image", "qwen-image-2.1"])
def test_lora_formats_equal_the_merged_formula_and_diffusers(fam, tmp_path):
    peer = load_peer(fam)
    path, _ = write(peer, tmp_path, "official")
    model = load_transformer(path)
    pairs = lora_pairs(peer)
    args, kw = inputs(peer)
    with torch.no_grad():
        plain = model(*args, **kw)
    scale = 0.7
    for style in STYLES:
        sd = lora_file(pairs, style)
        file = tmp_path / f"{style}.safetensors"
        save_file(sd, str(file))
        handle = mmdit.apply_lora(model, file, scale=scale)
        for n, (down, up, alpha) in pairs.items():  # per layer: scale * alpha / rank * up @ down
            want = scale * (alpha / down.shape[0] if style in ("kohya", "lightning", "lycoris") else 1.0) * up @ down
            ours = ours_delta(model, n, fam)
            assert rel(ours, want) <= 1e-5, (style, n)
        with torch.no_grad():
            got = model(*args, **kw)
        assert rel(got, run_peer(merged_peer(peer, pairs, style, scale), args, kw)) <= TOL, style
        if style in DIFFUSERS_READS and not (fam == "qwen-image-2.1" and style == "kohya"):
            # (diffusers 0.42.1 mis-names kohya's img_mlp_gate_layer as img_mlp.gate.layer: no reference)
            assert rel(got, run_peer(diffusers_loaded(peer, sd, scale), args, kw)) <= TOL, style
        assert rel(got, plain) >= EFFECT
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(*args, **kw), plain)


def ours_delta(model, diffusers_module, fam):
    """The low-rank delta our adapters give a diffusers module (its rows of our fused Linear)."""
    name, j, n, op = keymaps._match_diffusers(diffusers_module + ".weight", fam)
    lin = model.get_submodule(name[:-len(".weight")])
    delta = sum(a.delta() for a in lin.adapters)
    return delta if n == 1 else delta.chunk(n, dim=0)[j]


def test_kohya_names_of_our_fused_swiglu_too(tmp_path):
    """2.1: a LoRA on the fused gate_up (ComfyUI-trained) applies as one pair on all its rows."""
    peer = load_peer("qwen-image-2.1")
    model = load_transformer(write(peer, tmp_path, "official")[0])
    g = torch.Generator().manual_seed(1)
    lin = model.transformer_blocks[1].img_mlp.gate_up
    down, up = torch.randn(3, lin.in_features, generator=g), torch.randn(lin.out_features, 3, generator=g)
    handle = mmdit.apply_lora(model, {"lora_unet_transformer_blocks_1_img_mlp_gate_up.lora_down.weight": down,
                                      "lora_unet_transformer_blocks_1_img_mlp_gate_up.lora_up.weight": up,
                                      "lora_unet_transformer_blocks_1_img_mlp_gate_up.alpha": torch.tensor(1.5)})
    assert rel(model.transformer_blocks[1].img_mlp.gate_up.adapters[0].delta(), 0.5 * up @ down) <= 1e-6
    handle.remove()
