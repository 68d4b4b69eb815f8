"""Qwen-Image 1.0 and 2.1 checkpoints: key maps both ways (and diffusers' own 2.1 converter),
detection and ``mmdit inspect``, fp8 weights in memory, LoRA in the formats people train.

LoRA files are written in the layouts of diffusers / PEFT (``transformer.`` + lora_A/B, alpha in the
header), ComfyUI and ai-toolkit (``diffusion_model.`` + lora_A/B), kohya / musubi-tuner
(``lora_unet_<module with _>`` + lora_down/up + alpha), lightx2v Lightning (unprefixed lora_down/up
+ alpha), DiffSynth-Studio (unprefixed ``lora_A.default.weight``) and LyCORIS-named plain LoRA.
"""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import mmdit
from mmdit import fp8
from mmdit.cli import main as cli_main
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect
from mmdit.weights.transformer import load_transformer

import peers
import peers_qwen as pq
from peers_qwen import inputs, load_peer, rel, run_peer, write

TOL = 1e-5  # fp32 parity with diffusers, max|ours - peer| / max|peer|
EFFECT = 1e-3  # a LoRA must change the output at least this much
FP8_ROUNDING = 0.2  # fp8 weights in memory vs the full-precision output (e4m3: ~3% per weight)
LORA_DELTA = 1e-5  # our per-layer delta vs scale * alpha / rank * up @ down, relative


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
            assert rel(ours, want) <= LORA_DELTA, (style, n)
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
