"""Chroma checkpoints: every layout loads and equals diffusers' ChromaTransformer2DModel; the key table
agrees with diffusers' converter; fp8 / ComfyUI scaled fp8; LoRAs (diffusers / PEFT, kohya, ComfyUI)."""

import pytest
import torch
from safetensors.torch import save_file

import mmdit
from mmdit import fp8, lora
from mmdit.cli import main as cli_main
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect
from mmdit.weights.transformer import load_transformer

import peers
import peers_chroma as pc

TOL = 1e-5  # fp32 parity with diffusers, max|ours - peer| / max|peer|
SAME = 1e-5  # the same LoRA through two of our paths
EFFECT = 1e-2  # a LoRA must change the output at least this much, or the parity proves nothing
FP8_ROUNDING = 0.2  # fp8 weights kept in memory vs the full-precision model (e4m3: ~3% per weight)
# head_dim 128: the RoPE split is the released one, so files without config.json infer everything
PEER = dict(num_double=1, num_single=2, heads=1, head_dim=128, context_dim=32, axes=(16, 56, 56), approx_in=16,
            approx_hidden=48, approx_layers=2)


@pytest.fixture(scope="module")
def peer():
    return pc.chroma_peer(**PEER)


def write_official(peer, tmp, dtype):  # Chroma1-HD.safetensors: no prefix, nothing else
    return pc.save_original(peer, tmp / "Chroma1-HD.safetensors", dtype=dtype)


def write_comfy(peer, tmp, dtype):  # a ComfyUI all-in-one save: prefixed, with the T5 and the VAE beside it
    return pc.save_original(peer, tmp / "chroma_aio.safetensors", prefix="model.diffusion_model.", with_extras=True,
                            dtype=dtype)


def write_diffusion_model(peer, tmp, dtype):
    return pc.save_original(peer, tmp / "chroma_dm.safetensors", prefix="diffusion_model.", dtype=dtype)


def write_folder(peer, tmp, dtype):
    return pc.save_diffusers_folder(peer, tmp / "folder")


def write_sharded(peer, tmp, dtype):
    folder = pc.save_diffusers_folder(peer, tmp / "sharded", max_shard_size="300KB", pipeline=True)
    assert len(list((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    return folder


def write_diffusers_file(peer, tmp, dtype):
    return peers.save_diffusers_file(peer, tmp / "chroma_diffusers_keys.safetensors", dtype)


CASES = {"official": (write_official, None), "comfyui-prefixed": (write_comfy, None),
         "diffusion_model-prefix": (write_diffusion_model, None), "diffusers-folder": (write_folder, None),
         "diffusers-sharded-pipeline": (write_sharded, None), "diffusers-file": (write_diffusers_file, None),
         "official-bf16": (write_official, torch.bfloat16), "comfyui-fp8": (write_comfy, torch.float8_e4m3fn)}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_matches_diffusers(case, peer, tmp_path):
    write, dtype = CASES[case]
    model = load_transformer(write(peer, tmp_path, dtype))
    assert model.config.family == "chroma" and all(p.dtype == torch.float32 for p in model.parameters())
    err = pc.parity(model, peers.rounded(peer, dtype) if dtype is not None else peer)
    print(f"\n{case}: {err:.2e} ({model.detected.layout}, prefix {model.detected.prefix!r}, "
          f"config from {model.detected.config_source})")
    assert err <= TOL


def test_detection_names_chroma_and_inspect_says_so(peer, tmp_path, capsys):
    path = write_comfy(peer, tmp_path, None)
    det = detect({k: v.shape for k, v in pc.original_state(peer, "model.diffusion_model.").items()})
    assert (det.family, det.layout, det.prefix) == ("chroma", "original", "model.diffusion_model.")
    assert det.config.approximator_layers == 2 and det.config.approximator_hidden == 48
    full, _ = pc.full_size()  # the released sizes, diffusers names: the preset
    assert detect(full).preset == "chroma" and detect(keymaps.to_original(
        keymaps.from_diffusers(full, "chroma", 3072), "")).preset == "chroma"
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:       Chroma" in out and "text_encoders.t5xxl" in out


def test_full_size_key_table_matches_diffusers_and_its_converter():
    """At the released sizes (on meta): diffusers -> ours gives our model's keys and shapes (643 tensors;
    diffusers 1023), back again gives diffusers', and diffusers' single-file converter reads our
    (= the official) names into the same diffusers state dict."""
    dsd, _ = pc.full_size()
    ours = keymaps.from_diffusers(dsd, "chroma", 3072)
    model = mmdit.build_transformer("chroma", device="meta")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    back = keymaps.to_diffusers(ours, "chroma", 3072)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in dsd.items()}
    converted = pc.diffusers_convert(keymaps.to_original(ours, "model.diffusion_model."))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in dsd.items()}
    assert (len(ours), len(dsd)) == (643, 1023)


def test_diffusers_converter_reads_our_official_file_exactly(peer):
    """The official layout we write is what diffusers' own converter expects: bit-equal tensors."""
    converted = pc.diffusers_convert(pc.original_state(peer, "model.diffusion_model."), width=pc.hidden(peer))
    theirs = peers.diffusers_state(peer)
    assert converted.keys() == theirs.keys() and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    ours = keymaps.from_diffusers(theirs, "chroma", pc.hidden(peer))
    again = keymaps.to_diffusers(ours, "chroma", pc.hidden(peer))
    assert all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_a_flux_file_is_still_flux_and_a_broken_chroma_file_is_one_error(peer, tmp_path):
    flux = peers.save_original(peers.flux_peer(num_double=1, num_single=1, guidance=False), tmp_path / "f.safetensors",
                               prefix="", with_extras=False)
    assert load_transformer(flux).config.family == "flux"
    sd = pc.original_state(peer)
    del sd["distilled_guidance_layer.norms.1.scale"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): distilled_guidance_layer.norms.1.scale"):
        load_transformer(peers.save(sd, tmp_path / "broken.safetensors"))


# ---- fp8 ----------------------------------------------------------------------------------

def comfy_scaled_fp8(original: dict):
    """ComfyUI's old scaled-fp8 form: block Linear weights fp8 + ``scale_weight``, a ``scaled_fp8`` marker;
    the rest bf16. Returns (the file's tensors, the dequantized weights in our names)."""
    out, dequant = {}, {}
    for k, v in original.items():
        if v.dim() == 2 and "_blocks." in k and k.endswith(".weight"):
            q, scale = fp8.quantize(v)
            out[k], out[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(1)
            dequant[k] = q.float() * scale
        else:
            out[k] = v.to(torch.bfloat16)
            dequant[k] = out[k].float()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, dequant


def test_comfyui_scaled_fp8_loads_exactly_and_fp8_stays_fp8(peer, tmp_path):
    sd, dequant = comfy_scaled_fp8(pc.original_state(peer))
    path = peers.save(sd, tmp_path / "chroma_fp8_scaled.safetensors")
    model = load_transformer(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dequant.items())
    twin = peers.rounded(peer, torch.float32)
    twin.load_state_dict(keymaps.to_diffusers(dequant, "chroma", pc.hidden(peer)))
    assert pc.parity(model, twin) <= TOL
    kept = load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    qkv = kept.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, fp8.FP8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(kept.distilled_guidance_layer.in_proj, fp8.FP8Linear)  # stored bf16 in the file
    assert pc.parity(kept, twin) <= FP8_ROUNDING


# ---- LoRA ---------------------------------------------------------------------------------

def rand(shape, g, std=0.05):
    return torch.randn(shape, generator=g) * std


def diffusers_lora(peer, rank=4, seed=3):
    """transformer.<every diffusers Linear, the approximator's too>.lora_A/B.weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in peer.named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"transformer.{n}.lora_A.weight"] = rand((rank, m.in_features), g)
            sd[f"transformer.{n}.lora_B.weight"] = rand((m.out_features, rank), g)
    return sd


def ours_lora(model, style, rank=4, seed=5):
    """Every Linear of ours (blocks and approximator) in kohya (lora_unet_<name with _>) or ComfyUI
    (diffusion_model.<name>.lora_A/B) keys, with alpha = rank / 2; and the pairs themselves."""
    g = torch.Generator().manual_seed(seed)
    sd, pairs = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks.", "single_blocks.", "distilled_")):
            down, up = rand((rank, m.in_features), g), rand((m.out_features, rank), g)
            pairs[n] = (down, up)
            key = "lora_unet_" + n.replace(".", "_") if style == "kohya" else "diffusion_model." + n
            names = (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight",
                                                                                      ".lora_B.weight")
            sd[key + names[0]], sd[key + names[1]], sd[key + ".alpha"] = down, up, torch.tensor(rank / 2)
    return sd, pairs


def test_diffusers_lora_matches_diffusers_peft(peer, tmp_path):
    model = load_transformer(write_official(peer, tmp_path, None))
    x, sigma, ctx, mask = pc.inputs(peer)
    with torch.no_grad():
        plain = model(x, sigma, ctx, context_mask=mask)
    sd = diffusers_lora(peer)
    file = tmp_path / "chroma_lora.safetensors"
    save_file(sd, str(file))
    handle = mmdit.apply_lora(model, file, scale=0.7)
    twin = peers.rounded(peer, torch.float32)
    twin.load_lora_adapter({k: v.clone() for k, v in sd.items()}, prefix="transformer", adapter_name="x")
    twin.set_adapters(["x"], weights=[0.7])
    err = pc.parity(model, twin)
    print(f"\nChroma LoRA vs diffusers (PEFT): {err:.2e}")
    assert err <= 1e-4 and pc.rel(pc.run_peer(twin, x, sigma, ctx, mask), plain) >= EFFECT
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(x, sigma, ctx, context_mask=mask), plain)


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_kohya_and_comfy_loras_equal_the_merged_weights(peer, tmp_path, style):
    """W + scale * alpha / rank * up @ down on every block and approximator Linear, merged by hand."""
    path = write_official(peer, tmp_path, None)
    model, merged = load_transformer(path), load_transformer(path)
    sd, pairs = ours_lora(model, style)
    with torch.no_grad():
        for n, (down, up) in pairs.items():
            merged.get_submodule(n).weight += 0.7 * 0.5 * up @ down
    x, sigma, ctx, mask = pc.inputs(peer)
    mmdit.apply_lora(model, sd, scale=0.7)
    with torch.no_grad():
        got, want = model(x, sigma, ctx, context_mask=mask), merged(x, sigma, ctx, context_mask=mask)
    assert pc.rel(got, want) <= SAME


def test_a_flux_lora_with_modulation_layers_is_one_error(peer, tmp_path):
    model = load_transformer(write_official(peer, tmp_path, None))
    sd, _ = ours_lora(model, "kohya")
    sd["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.zeros(4, 128)
    sd["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] = torch.zeros(768, 4)
    with pytest.raises(CheckpointError, match=r"1 of its \d+ layers match no layer of this Chroma model.*\n.*img_mod_lin"):
        mmdit.apply_lora(model, sd)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
