"""LoRA files as the other trainers and tools write them, and refusals that name the right thing.

Files are built in exactly each tool's layout (``peers_lora`` says whose code each writer follows):
OneTrainer FLUX, SimpleTuner's LyCORIS ``algo=lora``, a PEFT ``save_pretrained`` folder (PEFT itself),
ComfyUI's LoraSave extraction (``bias_diff=True``: LoRA pairs, conv parts, ``.diff`` / ``.diff_b``),
kohya's SD3 ``emb_dims`` conv LoRA and a diffusers / PEFT conv LoRA. Every accepted layer must equal
the format's definition (alpha / rank * up @ down, per layer, 1e-5 relative), the output must equal
diffusers' (or PEFT's) where they read the format, and every error from ``load_transformer``,
``apply_lora`` and ``inspect`` is at most three lines, the first one complete on its own.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmdit
from helpers import rel_err
from mmdit import lora
from mmdit.cli import main as cli_main
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.transformer import load_transformer

import peers
import peers_lora as L

PER_LAYER = 1e-5  # max|our delta - the format's delta| / max|the format's delta|, per layer
TOL = 1e-5  # output vs diffusers / PEFT with the same LoRA, relative to the output scale
EFFECT = 1e-2  # the LoRA changes the output at least this much, or the parity proves nothing
SCALE = 0.7
FLUX = dict(num_double=1, num_single=1, heads=2, guidance=True)
SD35 = dict(num_layers=1, heads=2, head_dim=64, qk_norm=True, dual=(0,))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    peer = peers.flux_peer(**FLUX)
    return peer, peers.save_original(peer, tmp_path_factory.mktemp("flux") / "flux.safetensors", prefix="",
                                     with_extras=False)


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    peer = peers.sd3_peer(**SD35)
    return peer, peers.save_original(peer, tmp_path_factory.mktemp("sd35") / "sd35.safetensors", prefix="",
                                     with_extras=False)


def run(model, peer):
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    with torch.no_grad():
        return model(x, sigma, ctx, pooled, guidance=g)


def check_deltas(handle, want: dict, diffs: dict | None = None):
    """Each layer's delta (per unit scale) equals ``want``; the full differences equal ``diffs``."""
    assert set(handle.adapters) == set(want)
    for name, adapter in handle.adapters.items():
        got = adapter.delta() / handle.scale
        err = ((got - want[name]).abs().max() / want[name].abs().max()).item()
        assert err <= PER_LAYER, (name, err)
    assert set(handle.diffs) == set(diffs or {})
    for name, d in (diffs or {}).items():
        assert torch.equal(handle.diffs[name], d.float()), name


def save(sd, path, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---- 1. OneTrainer FLUX and SimpleTuner's LyCORIS algo=lora ---------------------------------

def test_onetrainer_flux_lora(flux, tmp_path):
    peer, path = flux
    model = load_transformer(path)
    plain = run(model, peer)
    sd, want = L.onetrainer_flux(peer)
    text = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 4),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    with pytest.warns(UserWarning, match="3 text-encoder LoRA tensors"):
        handle = mmdit.apply_lora(model, save({**sd, **text}, tmp_path / "onetrainer.safetensors"), scale=SCALE)
    check_deltas(handle, want)
    assert rel_err(run(model, peer), plain) >= EFFECT
    handle.remove()
    # diffusers reads OneTrainer's keys (its "mixture" branch) for the attention and embedder layers only
    # (it maps a block's ff / norm1 / proj_mlp LoRA to the block itself); those are compared with it
    readable = lambda n: ".attn." in n or not n.startswith(("transformer_blocks", "single_transformer_blocks"))  # noqa
    sd, want = L.onetrainer_flux(peer, only=readable)
    from diffusers import FluxPipeline

    handle = mmdit.apply_lora(model, save(sd, tmp_path / "attn.safetensors"), scale=SCALE)
    check_deltas(handle, want)
    twin = L.diffusers_reads(peer, sd, SCALE, converter=FluxPipeline.lora_state_dict)
    err = peers.parity(model, twin)
    print(f"\nOneTrainer FLUX LoRA vs diffusers: {err:.2e}")
    assert err <= TOL


def test_simpletuner_lycoris_lora(flux, tmp_path):
    """diffusers does not read ``lycoris_`` FLUX keys (ComfyUI does): the formula is the reference."""
    peer, path = flux
    model = load_transformer(path)
    plain = run(model, peer)
    sd, want = L.lycoris_flux(peer)
    handle = mmdit.apply_lora(model, save(sd, tmp_path / "lycoris.safetensors"), scale=SCALE)
    check_deltas(handle, want)
    assert rel_err(run(model, peer), plain) >= EFFECT


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_lokr_and_loha_apply_as_full_differences(algo, flux, tmp_path):
    """LoKr / LoHa layers become their full weight difference (LyCORIS' and ComfyUI's definition),
    added in place; diffusers reads LyCORIS LoKr for FLUX.2 only, so the formula is the reference."""
    peer, path = flux
    model = load_transformer(path)
    plain, before = run(model, peer), {k: v.clone() for k, v in model.state_dict().items()}
    sd, want = L.lycoris_kron_hada(peer, algo)
    with pytest.warns(UserWarning, match="full differences"):
        handle = mmdit.apply_lora(model, save(sd, tmp_path / f"{algo}.safetensors"), scale=SCALE)
    assert not handle.adapters and set(handle.diffs) == {f"{n}.weight" for n in want}
    for name, d in want.items():
        err = ((handle.diffs[f"{name}.weight"] - d).abs().max() / d.abs().max()).item()
        assert err <= PER_LAYER, (name, err)
    merged = load_transformer(path)
    with torch.no_grad():
        for name, d in want.items():
            merged.get_submodule(name).weight += SCALE * d
    assert rel_err(run(model, peer), run(merged, peer)) <= TOL and rel_err(run(model, peer), plain) >= EFFECT
    handle.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_lycoris_lokr_on_flux2_matches_diffusers(tmp_path):
    """diffusers reads LyCORIS LoKr for FLUX.2 (its converter, then PEFT's LoKr)."""
    import peers_flux2 as P
    from diffusers import Flux2Pipeline

    peer = P.flux2_peer(num_double=1, num_single=1, heads=2, guidance=True)
    model = load_transformer(P.save(P.bfl_state(peer), tmp_path / "flux2.safetensors"))
    g = torch.Generator().manual_seed(0)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    sd = {}
    for n, m in peer.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith(blocks):
            key = "lycoris_" + n.replace(".", "_")
            sd.update({f"{key}.lokr_w1": L.rand((4, 4), g, 0.5), f"{key}.alpha": torch.tensor(2.0),
                       f"{key}.lokr_w2_a": L.rand((m.out_features // 4, 4), g, 0.2),
                       f"{key}.lokr_w2_b": L.rand((4, m.in_features // 4), g, 0.2)})
    with pytest.warns(UserWarning, match="full differences"):
        mmdit.apply_lora(model, save(sd, tmp_path / "lokr.safetensors"), scale=SCALE)
    twin = peers.rounded(peer, torch.float32)
    twin.load_lora_adapter(Flux2Pipeline.lora_state_dict({k: v.clone() for k, v in sd.items()}), prefix="transformer",
                           adapter_name="x")
    twin.set_adapters(["x"], weights=[SCALE])
    err = P.parity(model, twin, refs=((1, 3, 2),))
    print(f"\nLyCORIS LoKr on FLUX.2 vs diffusers: {err:.2e}")
    assert err <= TOL


# ---- 2. PEFT save_pretrained folders: lora_alpha from adapter_config.json -------------------

PEFT_CONFIGS = {"plain": dict(r=4, lora_alpha=8),
                "patterns": dict(r=4, lora_alpha=8, rank_pattern={"to_q": 2, "proj_mlp": 6},
                                 alpha_pattern={"single_transformer_blocks.0.proj_out": 3.0, "norm_out.linear": 1.5}),
                "rslora": dict(r=4, lora_alpha=8, use_rslora=True)}


@pytest.mark.parametrize("setting", list(PEFT_CONFIGS))
def test_peft_folder_uses_its_adapter_config(setting, flux, tmp_path):
    peer, path = flux
    model = load_transformer(path)
    folder = tmp_path / "adapter"
    wrapped, want = L.peft_folder(peer, folder, **PEFT_CONFIGS[setting])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert all(k.startswith("base_model.model.") for k in load_file(str(folder / "adapter_model.safetensors")))
    for source in (folder, folder / "adapter_model.safetensors"):  # the folder, or the file beside its config
        handle = mmdit.apply_lora(model, source, scale=1.0)
        check_deltas(handle, want)
        err = peers.parity(model, wrapped)  # PEFT's own forward
        print(f"\nPEFT {setting} ({source.name}) vs PEFT: {err:.2e}")
        assert err <= TOL
        handle.remove()


def test_peft_file_alone_says_which_scale_it_assumed(flux, tmp_path):
    peer, path = flux
    model = load_transformer(path)
    _, want = L.peft_folder(peer, tmp_path / "adapter", r=4, lora_alpha=8)
    alone = shutil.copy(tmp_path / "adapter/adapter_model.safetensors", tmp_path / "alone.safetensors")
    with pytest.warns(UserWarning, match=r"without its adapter_config.json .*applied at alpha = rank \(scale 1\)") as w:
        handle = mmdit.apply_lora(model, alone)
    assert len([x for x in w if "adapter_config" in str(x.message)]) == 1  # said once
    check_deltas(handle, {k: v / 2 for k, v in want.items()})  # alpha 8 / r 4 was not applied


# ---- 3 and 4. SD3.5: ComfyUI's extraction (conv, .diff, .diff_b) and conv LoRAs -------------

def comfy_case(peer, path, tmp_path, names=lambda sd: sd):
    """(model, file, merged model, the file as a dict) for LoraSave over a random fine-tune of ``peer``."""
    base = names(peers.original_state(peer, ""))
    sd, merged = L.comfy_extracted(base, L.tuned(base))
    file = save({**sd, "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff": torch.zeros(8)},
                tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    return load_transformer(path), file, load_transformer(peers.save(merged, tmp_path / "merged.safetensors")), sd


def comfy_want(sd, model):
    """The format's definition: up @ down at scale 1 (no alpha), diffs as they are, in our names."""
    want, diffs = {}, {}
    params = dict(model.named_parameters())
    for k, t in sd.items():
        stem = k[len("diffusion_model."):]
        if k.endswith(".lora_up.weight"):
            name = stem[:-len(".lora_up.weight")]
            down = sd[f"diffusion_model.{name}.lora_down.weight"].float()
            want[name] = (t.float().flatten(1) @ down.flatten(1)).view(params[f"{name}.weight"].shape)
        elif k.endswith(".diff_b"):
            diffs[stem[:-len(".diff_b")] + ".bias"] = t
        elif k.endswith(".diff"):
            name = stem[:-len(".diff")]
            diffs[name + (".weight" if f"{name}.weight" in params else ".scale")] = t
    return want, diffs


def test_comfy_extraction_of_sd35_applies_conv_and_diffs(sd35, tmp_path):
    peer, path = sd35
    model, file, merged, sd = comfy_case(peer, path, tmp_path)
    assert sd["diffusion_model.x_embedder.proj.lora_down.weight"].dim() == 4  # the conv patch embed
    assert any(k.endswith(".diff") for k in sd) and any(k.endswith(".diff_b") for k in sd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning) as w:
        handle = mmdit.apply_lora(model, file)
    said = " ".join(str(x.message) for x in w)
    assert "1 text-encoder LoRA tensors" in said and "full differences (ComfyUI .diff / .diff_b" in said
    want, diffs = comfy_want(sd, model)
    check_deltas(handle, want, diffs)
    assert isinstance(model.x_embedder.proj, lora.LoRAConv2d)
    err = rel_err(run(model, peer), run(merged, peer))
    print(f"\nComfyUI SD3.5 extraction vs the merged weights: {err:.2e}")
    assert err <= TOL
    handle.set_scale(0.0)
    assert torch.equal(run(model, peer), run(load_transformer(path), peer))
    handle.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    fused = mmdit.apply_lora(model, file, fuse=True)
    assert rel_err(run(model, peer), run(merged, peer)) <= TOL
    fused.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_comfy_extraction_of_flux_matches_diffusers_on_its_lora_part(flux, tmp_path):
    """Current ComfyUI names FLUX's q / k norms ``*_norm.weight``: LoraSave writes ``*_norm.diff``.
    diffusers drops .diff / .diff_b (it logs so): its output is compared on the file without them."""
    peer, path = flux
    rename = lambda sd: {k.replace("_norm.scale", "_norm.weight"): v for k, v in sd.items()}  # noqa: E731
    model, file, merged, sd = comfy_case(peer, path, tmp_path, rename)
    assert any(k.endswith("query_norm.diff") for k in sd)
    with pytest.warns(UserWarning, match="full differences"):
        handle = mmdit.apply_lora(model, file)
    check_deltas(handle, *comfy_want(sd, model))
    assert rel_err(run(model, peer), run(merged, peer)) <= TOL
    handle.remove()
    # diffusers' kohya / ComfyUI FLUX reader leaves the layers outside the blocks without its "transformer."
    # prefix (load_lora_adapter then skips them): the blocks are compared
    pairs = {k: v for k, v in sd.items() if ".lora_" in k and k.startswith(("diffusion_model.double_blocks",
                                                                             "diffusion_model.single_blocks"))}
    handle = mmdit.apply_lora(model, pairs, scale=SCALE)
    h = peers.hidden(peer)
    err = peers.parity(model, L.diffusers_reads(peer, pairs, SCALE, converter=L.kohya_flux_converter(h, 4 * h)))
    print(f"\nComfyUI FLUX extraction (LoRA part) vs diffusers: {err:.2e}")
    assert err <= TOL


def test_kohya_and_peft_conv_loras_on_the_patch_embed(sd35, tmp_path):
    peer, path = sd35
    model = load_transformer(path)
    plain = run(model, peer)
    sd, want = L.kohya_conv(hidden=peers.hidden(peer))
    handle = mmdit.apply_lora(model, sd, scale=SCALE)
    check_deltas(handle, {"x_embedder.proj": want})
    handle.remove()
    # diffusers / PEFT keys: pos_embed.proj as a conv LoRA (lora_A a kernel, lora_B 1x1), read by diffusers
    g = torch.Generator().manual_seed(2)
    conv = {"transformer.pos_embed.proj.lora_A.weight": L.rand((4, 16, 2, 2), g),
            "transformer.pos_embed.proj.lora_B.weight": L.rand((peers.hidden(peer), 4, 1, 1), g),
            "transformer.context_embedder.lora_A.weight": L.rand((4, 40), g),
            "transformer.context_embedder.lora_B.weight": L.rand((peers.hidden(peer), 4), g)}
    handle = mmdit.apply_lora(model, save(conv, tmp_path / "conv.safetensors"), scale=SCALE)
    err = peers.parity(model, L.diffusers_reads(peer, conv, SCALE))
    print(f"\nconv LoRA on pos_embed.proj vs diffusers: {err:.2e}")
    assert err <= TOL and rel_err(run(model, peer), plain) >= EFFECT


# ---- 5 and 6. refusals that name the right thing, in at most three lines ---------------------

def _flux_sd(peer):
    return peers.original_state(peer, "")


def lone_shard(peer, tmp):
    sd = _flux_sd(peer)
    keys = sorted(sd)
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        peers.save({k: sd[k] for k in part}, tmp / f"flux1-dev-0000{i + 1}-of-00002.safetensors")
    return tmp / "flux1-dev-00001-of-00002.safetensors"


def xlabs_controlnet(peer, tmp):
    """XLabs' FLUX ControlNet: BFL-named double blocks + controlnet_blocks, input_hint_block, pos_embed_input."""
    sd = {k: v for k, v in _flux_sd(peer).items() if not k.startswith(("single_blocks", "final_layer"))}
    h = peers.hidden(peer)
    sd.update({"controlnet_blocks.0.weight": torch.zeros(h, h), "controlnet_blocks.0.bias": torch.zeros(h),
               "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "pos_embed_input.weight": torch.zeros(h, 64)})
    return peers.save(sd, tmp / "flux-canny-controlnet-v3.safetensors")


def diffusers_controlnet(peer, tmp):
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                              num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=24,
                              guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return peers.save(dict(net.state_dict()), tmp / "diffusion_pytorch_model.safetensors")


def comfy_nvfp4(peer, tmp):
    """ComfyUI's nvfp4 layers: uint8 (out, in/2) weights, fp8 block scales padded to (128k, 4k), a
    per-tensor weight_scale_2 and a comfy_quant marker."""
    sd = _flux_sd(peer)
    for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
        n, kk = sd[k].shape
        stem = k[:-len(".weight")]
        sd[k] = torch.zeros(n, kk // 2, dtype=torch.uint8)
        sd[stem + ".weight_scale"] = torch.ones(-(-n // 128) * 128, -(-(kk // 16) // 4) * 4).to(torch.float8_e4m3fn)
        sd[stem + ".weight_scale_2"] = torch.ones(())
        sd[stem + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    return peers.save(sd, tmp / "flux1-dev-nvfp4.safetensors")


def flux_head_dim_32(_, tmp):
    peer = peers.flux_peer(num_double=1, num_single=1, heads=2, head_dim=32, axes=(4, 14, 14))
    return peers.save_original(peer, tmp / "hd32.safetensors", prefix="", with_extras=False)


def unmerged_lora(peer, tmp):
    return peers.save({**_flux_sd(peer), "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 256),
                       "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(768, 4)}, tmp / "residue.safetensors")


def keys_missing(peer, tmp):
    return peers.save({k: v for k, v in _flux_sd(peer).items() if not k.startswith("double_blocks.0.img_attn.proj")},
                      tmp / "partial.safetensors")


def other_lone_shard(peer, tmp):  # the shard without the keys that tell the model
    lone_shard(peer, tmp)
    return tmp / "flux1-dev-00002-of-00002.safetensors"


def comfy_lora_file(peer, tmp):
    base = _flux_sd(peer)
    return peers.save(L.comfy_extracted(base, L.tuned(base))[0], tmp / "ComfyUI_extracted_lora_00001_.safetensors")


LOAD_REFUSALS = {  # what: (make the file, words its first line must hold)
    "a lone shard": (lone_shard, "one shard of a multi-file set: point at the folder or its index.json"),
    "the other lone shard": (other_lone_shard, "one shard of a multi-file set: point at the folder or its index.json"),
    "XLabs FLUX ControlNet": (xlabs_controlnet, "is a ControlNet"),
    "diffusers FLUX ControlNet": (diffusers_controlnet, "is a ControlNet"),
    "ComfyUI nvfp4": (comfy_nvfp4, "is a ComfyUI nvfp4 (4-bit NVIDIA FP4"),
    "head_dim 32 without axes_dim": (flux_head_dim_32, "config={'axes_dim': (4, 14, 14)})"),
    "an unmerged LoRA": (unmerged_lora, "the file holds an unmerged LoRA beside the model"),
    "a ComfyUI-extracted LoRA": (comfy_lora_file, "is a LoRA adapter"),
    "keys missing": (keys_missing, "only keys are missing"),
}


@pytest.mark.parametrize("what", list(LOAD_REFUSALS))
def test_load_and_inspect_refusals_name_the_format_first(what, flux, tmp_path, capsys):
    make, words = LOAD_REFUSALS[what]
    path = make(flux[0], tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    lines = str(e.value).splitlines()
    print(f"\n{what}: {len(lines)} line(s): {lines[0]}")
    assert len(lines) <= 3 and words in lines[0]
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 3 and words in err[0]


def lycoris_loha(model):
    return {"lora_unet_double_blocks_0_img_mlp_0.hada_w1_a": torch.zeros(2, 2),
            "lora_unet_double_blocks_0_img_mlp_0.hada_t1": torch.zeros(2, 2, 3, 3)}


def wide(model):
    """A LoRA for a FLUX twice as wide: every layer's shapes differ."""
    g = torch.Generator().manual_seed(0)
    return {f"lora_unet_{n.replace('.', '_')}.{r}": L.rand(s, g) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            for r, s in (("lora_down.weight", (4, 2 * m.in_features)), ("lora_up.weight", (2 * m.out_features, 4)))}


def sd3_lora(model):
    g = torch.Generator().manual_seed(0)
    return {f"lora_unet_joint_blocks_0_{part}.{r}": L.rand(s, g) for part in ("x_block_attn_qkv", "x_block_mlp_fc1",
                                                                              "context_block_attn_proj")
            for r, s in (("lora_down.weight", (4, 128)), ("lora_up.weight", (384, 4)))}


APPLY_REFUSALS = {  # what: (the LoRA for the FLUX model, words its first line must hold)
    "an SD3 LoRA on FLUX": (sd3_lora, "it is a LoRA for SD3 / SD3.5, not for this FLUX.1 model"),
    "a LoRA for another width": (wide, "layers have shapes this FLUX.1 model's layers don't have"),
    "LoHa with Tucker tensors": (lycoris_loha, "is a LoHa (LyCORIS) adapter with Tucker tensors"),
    "LoKr with a Tucker tensor": (lambda m: {"lycoris_transformer_blocks_0_attn_to_q.lokr_t2": torch.zeros(2, 2, 3, 3)},
                                  "is a LoKr (LyCORIS) adapter with a Tucker tensor"),
    "half a LoKr": (lambda m: {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.zeros(2, 2)},
                    "a LoKr layer with only ['lokr_w1']"),
    "DoRA": (lambda m: {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(256)},
             "is a DoRA adapter"),
    "Tucker LoCon": (lambda m: {"lora_unet_x_embedder_proj.lora_mid.weight": torch.zeros(4, 4, 3, 3)},
                     "is a LoCon with a mid (Tucker) tensor"),
    "half a pair": (lambda m: {"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": torch.zeros(4, 256)},
                    "have only half a LoRA pair"),
}


@pytest.mark.parametrize("what", list(APPLY_REFUSALS))
def test_apply_refusals_name_the_format_first_and_change_nothing(what, flux):
    make, words = APPLY_REFUSALS[what]
    model = load_transformer(flux[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        mmdit.apply_lora(model, make(model))
    lines = str(e.value).splitlines()
    print(f"\n{what}: {len(lines)} line(s): {lines[0]}")
    assert len(lines) <= 3 and words in lines[0]
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_bfl_control_lora_makes_the_depth_model_as_diffusers_does(flux, tmp_path):
    peer, path = flux
    model = load_transformer(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = L.bfl_control(model)
    # diffusers' converter swaps the halves of final_layer.adaLN_modulation.1's lora_A (its rank rows) as well
    # as lora_B's, so its B A is not the swapped delta; lora_A rows equal in both halves make it exact
    a = sd["final_layer.adaLN_modulation.1.lora_A.weight"]
    sd["final_layer.adaLN_modulation.1.lora_A.weight"] = torch.cat([a[:2], a[:2]])
    with pytest.warns(UserWarning, match="lora_B.bias"):
        handle = mmdit.apply_lora(model, save(sd, tmp_path / "flux1-depth-dev-lora.safetensors"), scale=SCALE)
    lora_a = [k[:-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")]
    check_deltas(handle, {n: sd[f"{n}.lora_B.weight"] @ sd[f"{n}.lora_A.weight"] for n in lora_a},  # alpha = rank
                 {f"{n}.bias": sd[f"{n}.lora_B.bias"] for n in lora_a})
    assert model.config.in_channels == 128 and model.config.condition_channels == 16
    assert model.img_in.in_features == 128 and model.double_blocks[0].img_attn.norm.query_norm.scale.equal(
        sd["double_blocks.0.img_attn.norm.query_norm.scale"])
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    control = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    twin = L.diffusers_control(peer, sd, SCALE)
    want = L.run_control(twin, x, control, sigma, ctx, pooled, g)
    with torch.no_grad():
        got = model(torch.cat([x, control], 1), sigma, ctx, pooled, guidance=g)
    err = rel_err(got, want)
    print(f"\nBFL Control LoRA vs diffusers' FluxControlPipeline loader: {err:.2e}")
    assert err <= TOL
    handle.remove()
    assert model.config.in_channels == 64 and isinstance(model.img_in, torch.nn.Linear)
    assert model.img_in.in_features == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match="FLUX.1 Depth / Canny Control LoRA: it applies to FLUX.1-dev only"):
        mmdit.apply_lora(load_transformer(peers.save_original(peers.sd3_peer(**SD35), tmp_path / "s.safetensors",
                                                               prefix="", with_extras=False)), sd)


def test_a_flux_lora_on_sd3_is_named_in_three_lines(sd35, flux):
    model = load_transformer(sd35[1])
    with pytest.raises(CheckpointError) as e:
        mmdit.apply_lora(model, wide(load_transformer(flux[1])))
    lines = str(e.value).splitlines()
    assert len(lines) <= 3 and "it is a LoRA for FLUX.1" in lines[0] and "not for this SD3 / SD3.5 model" in lines[0]


def test_peft_dora_folder_and_missing_adapter_are_named(flux, tmp_path):
    model = load_transformer(flux[1])
    (tmp_path / "dora").mkdir()
    save({"base_model.model.x_embedder.lora_A.weight": torch.zeros(4, 64),
          "base_model.model.x_embedder.lora_B.weight": torch.zeros(256, 4)},
         tmp_path / "dora/adapter_model.safetensors")
    (tmp_path / "dora/adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "use_dora": True}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("")
    for source, words in ((tmp_path / "dora", "is a DoRA adapter"), (tmp_path / "empty", "has no adapter_model")):
        with pytest.raises(CheckpointError) as e:
            mmdit.apply_lora(model, source)
        assert len(str(e.value).splitlines()) == 1 and words in str(e.value)


# ---- 7. inspect: the transformer's own format, config overrides -----------------------------

def test_inspect_ignores_a_bundled_t5s_fp8_scales(flux, tmp_path, capsys):
    sd = {f"model.diffusion_model.{k}": v for k, v in _flux_sd(flux[0]).items()}
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    sd.update({f"{t5}.weight": torch.ones(8, 8).to(torch.float8_e4m3fn), f"{t5}.scale_weight": torch.tensor(0.5)})
    assert cli_main(["inspect", str(peers.save(sd, tmp_path / "all_in_one.safetensors"))]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["format"].strip() == "plain tensors"


def test_inspect_takes_config_overrides(tmp_path, capsys):
    path = flux_head_dim_32(None, tmp_path)
    assert cli_main(["inspect", str(path)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    example = first.split("config={'axes_dim': ")[1].split(")")[0] + ")"
    assert sum(eval(example)) == 32  # the example split sums to head_dim
    assert cli_main(["inspect", str(path), "--config", "axes_dim=4,14,14"]) == 0
    assert "axes_dim=(4, 14, 14)" in capsys.readouterr().out
    assert load_transformer(path, config={"axes_dim": (4, 14, 14)}).config.axes_dim == (4, 14, 14)


@pytest.mark.slow
def test_conv_lora_and_diffs_compile_without_graph_breaks(sd35, tmp_path):
    peer, path = sd35
    model, file, merged, _ = comfy_case(peer, path, tmp_path)
    with pytest.warns(UserWarning):
        handle = mmdit.apply_lora(model, file, scale=SCALE)
    x, sigma, ctx, pooled, _ = peers.inputs(peer)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x, sigma, ctx, pooled).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        want = model(x, sigma, ctx, pooled)
        assert rel_err(compiled(x, sigma, ctx, pooled), want) <= TOL
        handle.set_scale(0.0)  # the conv adapter's scale is a buffer, the diffs are taken out in place
        with torch._dynamo.config.patch(error_on_recompile=True):
            off = compiled(x, sigma, ctx, pooled)
    assert rel_err(off, run(load_transformer(path), peer)) <= TOL
    handle.remove()
    torch._dynamo.reset()


def test_a_diffusers_save_lora_weights_folder_is_read_too(flux, tmp_path):
    peer, path = flux
    model = load_transformer(path)
    sd, want = L.onetrainer_flux(peer)
    folder = tmp_path / "lora"
    save(sd, folder / "pytorch_lora_weights.safetensors")  # diffusers' save_lora_weights(folder) file name
    check_deltas(mmdit.apply_lora(model, folder), want)
