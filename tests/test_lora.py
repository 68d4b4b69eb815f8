"""LoRA: every file layout people have gives diffusers' output; unfused, fused, stacked, removed.

LoRA files are written in the key layouts of kohya sd-scripts (networks/lora_flux.py,
lora_sd3.py: ``lora_unet_<module>.lora_down/up.weight`` + ``.alpha``), diffusers / PEFT
(``transformer.<module>.lora_A/B.weight``), ComfyUI (``diffusion_model.<module>.lora_A/B.weight``
+ ``.alpha``) and XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``). diffusers loads
the same file (its own converters for kohya / XLabs) into a random peer with peft.
"""
import functools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mmdit
from helpers import rel_err
from mmdit import fp8, lora
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.transformer import load_transformer

import peers
import peers_lora

TOL = 1e-4  # fp32 parity with diffusers, relative to the output scale
SAME = 1e-5  # the same LoRA through two of our paths (fused vs unfused, two file layouts)
EFFECT = 1e-2  # a LoRA must change the output at least this much, or the parity proves nothing
REQUANTIZED = 0.1  # fused into fp8 weights: the merged weight is rounded to fp8 again (measured ~0.03)
PIXEL_LEVELS = 1.0  # mean |difference| in 8-bit levels for "the image changed"
SCALE = 0.7

FAMILIES = {"flux": dict(num_double=1, num_single=2, heads=2, guidance=True),
            "sd3.5": dict(num_layers=2, heads=2, head_dim=64, qk_norm=True, dual=(0,))}


@functools.lru_cache(maxsize=None)
def _base(name, tmp):
    peer = (peers.flux_peer if name == "flux" else peers.sd3_peer)(**FAMILIES[name], seed=0)
    path = peers.save_original(peer, tmp / f"{name}.safetensors", prefix="", with_extras=False)
    return peer, path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    return lambda name: _base(name, tmp)


def rand(shape, g, std=0.05):
    return torch.randn(shape, generator=g) * std


def diffusers_lora(peer, rank=4, seed=3):
    """transformer.<every diffusers Linear>.lora_A/B.weight, ranks rank and rank + 1 alternating."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    linears = [(n, m) for n, m in peer.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, (n, m) in enumerate(linears):
        r = rank + i % 2
        sd[f"transformer.{n}.lora_A.weight"] = rand((r, m.in_features), g)
        sd[f"transformer.{n}.lora_B.weight"] = rand((m.out_features, r), g)
    return sd


def ours_pairs(model, rank=4, seed=5, within=("double_blocks.", "single_blocks.", "joint_blocks.")):
    """Our Linear name -> (down, up, alpha = rank / 2) for the Linears in the blocks."""
    g = torch.Generator().manual_seed(seed)
    return {n: (rand((rank, m.in_features), g), rand((m.out_features, rank), g), rank / 2)
            for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, fp8.FP8Linear)) and n.startswith(within)}


def ours_lora(model, style, **kw):
    """``ours_pairs`` in kohya (lora_unet_<name with _>.lora_down/up) or ComfyUI keys (lora_A/B,
    ``diffusion_model.`` or ``model.diffusion_model.`` before our names)."""
    sd = {}
    for n, (down, up, alpha) in ours_pairs(model, **kw).items():
        key = {"kohya": "lora_unet_" + n.replace(".", "_"), "comfy": "diffusion_model." + n,
               "prefixed": "model.diffusion_model." + n}[style]
        names = (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight", ".lora_B.weight")
        sd[key + names[0]], sd[key + names[1]] = down, up
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


def xlabs_lora(model, rank=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    sd, h = {}, model.config.hidden_size
    for i in range(model.config.num_double):
        for name, out in (("qkv_lora1", 3 * h), ("qkv_lora2", 3 * h), ("proj_lora1", h), ("proj_lora2", h)):
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = rand((rank, h), g)
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = rand((out, rank), g)
    for i in range(model.config.num_single):
        sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = rand((rank, h), g)
        sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = rand((3 * h, rank), g)
    return sd


def with_diffusers_lora(peer, sd, layout, scale):
    """A copy of the peer with the LoRA loaded by diffusers (its converters) at ``scale``."""
    from diffusers.loaders import lora_conversion_utils as lcu

    twin = peers.rounded(peer, torch.float32)
    sd = {k: v.clone() for k, v in sd.items()}
    if layout == "kohya":
        h = peers.hidden(peer)
        sd = peers_lora.kohya_flux_converter(h, 4 * h)(sd)
    elif layout == "xlabs":
        sd = lcu._convert_xlabs_flux_lora_to_diffusers(sd)
    twin.load_lora_adapter(sd, prefix="transformer", adapter_name="x")
    twin.set_adapters(["x"], weights=[scale])
    return twin



def run(model, peer, **kw):
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    with torch.no_grad():
        return model(x, sigma, ctx, pooled, guidance=g, **kw)


CASES = {"flux-diffusers": ("flux", "diffusers"), "flux-kohya": ("flux", "kohya"), "flux-xlabs": ("flux", "xlabs"),
         "sd3.5-diffusers": ("sd3.5", "diffusers")}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_diffusers(case, base, tmp_path):
    name, layout = CASES[case]
    peer, path = base(name)
    model = load_transformer(path)
    plain = run(model, peer)
    sd = {"diffusers": lambda: diffusers_lora(peer), "kohya": lambda: ours_lora(model, "kohya"),
          "xlabs": lambda: xlabs_lora(model)}[layout]()
    file = tmp_path / "lora.safetensors"
    save_file(sd, str(file))
    handle = mmdit.apply_lora(model, file, scale=SCALE)
    err = peers.parity(model, with_diffusers_lora(peer, sd, layout, SCALE))
    print(f"\n{case}: LoRA output vs diffusers {err:.2e}")
    assert err <= TOL
    assert rel_err(run(model, peer), plain) >= EFFECT
    handle.remove()
    assert torch.equal(run(model, peer), plain)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kohya_and_comfy_layouts_equal_the_merged_formula(name, base):
    """W + scale * alpha / rank * up @ down, merged by hand (diffusers has no SD3 kohya reader)."""
    peer, path = base(name)
    model = load_transformer(path)
    merged = load_transformer(path)
    with torch.no_grad():
        for n, (down, up, alpha) in ours_pairs(model).items():
            merged.get_submodule(n).weight += SCALE * alpha / down.shape[0] * up @ down
    want = run(merged, peer)
    for style in ("kohya", "comfy", "prefixed"):
        handle = mmdit.apply_lora(model, ours_lora(model, style), scale=SCALE)
        assert rel_err(run(model, peer), want) <= SAME, style
        handle.remove()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unfused_fused_stacked_and_removed(name, base):
    peer, path = base(name)
    model = load_transformer(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(model, peer)
    a_sd, b_sd = diffusers_lora(peer, seed=11), diffusers_lora(peer, seed=12)

    a = mmdit.apply_lora(model, a_sd, scale=0.5)
    assert set(before) <= set(model.state_dict())  # base weights keep their names
    only_a = run(model, peer)
    a.set_scale(0.0)
    assert torch.equal(run(model, peer), plain)
    a.set_scale(1.0)
    b = mmdit.apply_lora(model, b_sd, scale=1.0)  # stacked
    both = run(model, peer)
    a.remove()
    only_b = run(model, peer)
    b.remove()
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    fa = mmdit.apply_lora(model, a_sd, scale=1.0, fuse=True)  # fused == unfused
    fb = mmdit.apply_lora(model, b_sd, scale=1.0, fuse=True)
    assert rel_err(run(model, peer), both) <= SAME
    with pytest.raises(RuntimeError, match="reverse order"):
        fa.remove()
    fb.remove()
    fa.set_scale(0.5)
    assert rel_err(run(model, peer), only_a) <= SAME
    fa.remove()
    fa.remove()  # idempotent
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # bit-exact
    assert rel_err(only_b, plain) >= EFFECT and rel_err(both, only_b) >= EFFECT


def test_lora_on_an_fp8_model_and_with_the_fork(base):
    peer, path = base("flux")
    model = load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = ours_lora(model, "kohya")
    fork = torch.tensor([False, True, True])
    unfused = mmdit.apply_lora(model, sd, scale=SCALE)
    want = run(model, peer, fork=fork)
    unfused.remove()
    fused = mmdit.apply_lora(model, sd, scale=SCALE, fuse=True)
    got = run(model, peer, fork=fork)
    print(f"\nfused into fp8 vs unfused: {rel_err(got, want):.2e}")
    assert got.shape[0] == 5 and rel_err(got, want) <= REQUANTIZED
    fused.remove()
    assert all(torch.equal(model.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                           else model.state_dict()[k], v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
               for k, v in before.items())
    assert isinstance(model.double_blocks[0].img_attn.qkv, fp8.FP8Linear)


@pytest.mark.slow
def test_lora_compiles_without_graph_breaks_and_set_scale_needs_no_recompile(base):
    peer, path = base("flux")
    model = load_transformer(path)
    plain = run(model, peer)
    handle = mmdit.apply_lora(model, ours_lora(model, "kohya"), scale=SCALE)
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    torch._dynamo.reset()
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    for kw in ({}, {"fork": slice(1, None)}):  # the plain forward and the DG fork (the last rows)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x, sigma, ctx, pooled, guidance=g, **kw).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        with_lora = compiled(x, sigma, ctx, pooled, guidance=g)
        handle.set_scale(0.0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            off = compiled(x, sigma, ctx, pooled, guidance=g)
    assert rel_err(with_lora, plain) >= EFFECT and rel_err(off, plain) <= SAME
    handle.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("what, edit, pattern", [
    ("another model's layer", lambda sd, m: {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight":
                                             torch.zeros(4, 256), **sd},
     r"1 of its \d+ layers match no layer of this FLUX.1 model"),
    ("rank mismatch", lambda sd, m: {**sd, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                                     torch.zeros(768, 3)}, r"lora_unet_double_blocks_0_img_attn_qkv: down \(4, 256\), "
                                                           r"up \(768, 3\) do not fit"),
    ("wrong width", lambda sd, m: {**sd, "lora_unet_single_blocks_1_linear2.lora_down.weight": torch.zeros(4, 100)},
     r"single_blocks_1_linear2: down \(4, 100\)"),
    ("half a pair", lambda sd, m: {k: v for k, v in sd.items() if k != "lora_unet_double_blocks_0_img_mlp_0"
                                   ".lora_up.weight"}, r"needs both down \(A\) and up \(B\)"),
    ("conv LoRA of the wrong kernel", lambda sd, m: {
        **sd, "lora_unet_x_embedder_proj.lora_down.weight": torch.zeros(4, 16, 3, 3),
        "lora_unet_x_embedder_proj.lora_up.weight": torch.zeros(128, 4, 1, 1)},
     r"lora_unet_x_embedder_proj: down \(4, 16, 3, 3\), up \(128, 4, 1, 1\) do not fit x_embedder.proj"),
    ("LyCORIS", lambda sd, m: {**sd, "lora_unet_double_blocks_0_img_mlp_0.hada_w1_a": torch.zeros(2, 2)},
     r"a LoHa layer with only \['hada_w1_a'\]"),
])
def test_bad_loras_are_one_error_and_change_nothing(what, edit, pattern, base):
    peer, path = base("sd3.5" if what.startswith("conv LoRA") else "flux")
    model = load_transformer(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern) as e:
        mmdit.apply_lora(model, edit(ours_lora(model, "kohya"), model))
    assert len(str(e.value).splitlines()) <= 3
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_text_encoder_parts_are_named_not_silently_dropped(base):
    peer, path = base("flux")
    model = load_transformer(path)
    sd = {**ours_lora(model, "kohya"), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
          torch.zeros(4, 8)}
    with pytest.warns(UserWarning, match="1 text-encoder LoRA tensors"):
        mmdit.apply_lora(model, sd)


# ---- training: inject, save in both formats, load back here and in diffusers ----------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_injected_lora_trains_and_saves_in_both_formats(name, base, tmp_path):
    peer, path = base(name)
    model = load_transformer(path)
    handle = lora.inject_lora(model, rank=4, alpha=8, targets=["*attn*", "*linear1", "*mlp*"])
    params = handle.parameters()
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    model(x, sigma, ctx, pooled, guidance=g).square().mean().backward()
    assert all(p.grad is not None for p in params)
    with torch.no_grad():  # stand-in for training: non-zero ups
        gen = torch.Generator().manual_seed(9)
        for a in handle.adapters.values():
            a.up.copy_(rand(a.up.shape, gen))
    trained = run(model, peer)
    files = {f: lora.save_lora(handle, tmp_path / f"{f}.safetensors", format=f) for f in ("diffusers", "kohya")}
    handle.remove()
    for fmt, file in files.items():
        fresh = load_transformer(path)
        mmdit.apply_lora(fresh, file)
        assert rel_err(run(fresh, peer), trained) <= SAME, fmt
    # diffusers reads the diffusers file (alpha from its metadata), and for FLUX the kohya one
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe_cls = FluxPipeline if name == "flux" else StableDiffusion3Pipeline
    sd, meta = pipe_cls.lora_state_dict(str(files["diffusers"]), return_lora_metadata=True)
    twin = peers.rounded(peer, torch.float32)
    twin.load_lora_adapter(sd, prefix="transformer", metadata=meta)
    assert rel_err(peers.run_peer(twin, x, sigma, ctx, pooled, g), trained) <= TOL
    if name == "flux":
        from safetensors.torch import load_file

        twin = with_diffusers_lora(peer, load_file(str(files["kohya"])), "kohya", 1.0)
        assert rel_err(peers.run_peer(twin, x, sigma, ctx, pooled, g), trained) <= TOL


# ---- the Pipeline and the CLI --------------------------------------------------------------

def test_pipeline_with_lora_matches_diffusers_load_lora_weights(tmp_path, monkeypatch):
    from helpers import PIXEL_TOL
    from peers import H, PROMPTS, T5_LEN, W, flux_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, peer = flux_folder(tmp_path)
    file = tmp_path / "l.safetensors"
    save_file(diffusers_lora(peer.transformer, seed=21), str(file))
    peer.load_lora_weights(str(file), adapter_name="x")
    peer.set_adapters(["x"], [SCALE])
    latents = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    ref = peer(PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=H, width=W, latents=peers.pack(latents),
               max_sequence_length=T5_LEN, output_type="np").images
    kw = dict(height=H, width=W, latents=latents, max_sequence_length=T5_LEN, output="np", steps=3, cfg=1.0,
              guidance=3.5)
    ours = mmdit.Pipeline.from_pretrained(folder, lora=[(file, SCALE)])
    images = ours(PROMPTS, **kw)
    plain = mmdit.Pipeline.from_pretrained(folder)(PROMPTS, **kw)
    err = abs(images - ref).max()
    print(f"\npipeline with LoRA vs diffusers load_lora_weights: max pixel error {err:.2e}")
    assert err <= PIXEL_TOL and abs(images - plain).max() * 255 > PIXEL_LEVELS
    # fp8 weights with two LoRAs stacked on them
    pipe = mmdit.Pipeline.from_pretrained(folder, lora=[(file, 0.5), (file, 0.25)], weight_dtype=torch.float8_e4m3fn)
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, lora.LoRALinear) and len(qkv.adapters) == 2 and qkv.weight.dtype == torch.float8_e4m3fn
    assert abs(pipe(PROMPTS, **kw) - plain).max() * 255 > PIXEL_LEVELS


def test_cli_generate_with_lora_and_fp8(tmp_path):
    from PIL import Image

    from mmdit.cli import main
    from mmdit.tiny import load_tiny

    handle = lora.inject_lora(load_tiny().transformer, rank=2, targets=["*attn.qkv"])
    with torch.no_grad():
        for a in handle.adapters.values():
            a.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    file = lora.save_lora(handle, tmp_path / "tiny_lora.safetensors", format="kohya")
    argv = ["generate", "--prompt", "a red circle on a blue background", "--steps", "3"]
    images = {}
    for name, extra in {"plain": [], "lora": ["--lora", f"{file}:0.8"], "fp8": ["--weight-dtype", "fp8"]}.items():
        assert main([*argv, *extra, "--output", str(tmp_path / f"{name}.png")]) == 0
        images[name] = torch.from_numpy(np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float32))
    assert (images["lora"] - images["plain"]).abs().mean() > PIXEL_LEVELS
    assert (images["fp8"] - images["plain"]).abs().mean() < 16 * PIXEL_LEVELS  # fp8 rounding, the same picture
    assert main([*argv, "--lora", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "x.png")]) == 2
