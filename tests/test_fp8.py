"""fp8: ComfyUI scaled-fp8 files load exactly, and fp8 weights stay fp8 in memory.

Files are written in ComfyUI's two layouts (REFERENCE: comfy/ops.py, comfy/model_detection.py):
  old: <layer>.weight float8_e4m3fn + <layer>.scale_weight (fp32 scalar) + a top-level
       ``scaled_fp8`` marker (+ <layer>.scale_input on some layers)
  new: <layer>.weight float8_e4m3fn + <layer>.weight_scale + <layer>.comfy_quant (uint8 JSON)
Norms, biases and the embedders stay bf16, as in ComfyUI's files.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from mmdit import fp8
from mmdit.cli import main as cli_main
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.transformer import load_transformer

import peers

TOL = 1e-4  # fp32 parity with diffusers, relative to the output scale
SAME = 1e-6  # the same weights through two code paths
FP8_MEMORY = 0.55  # weight bytes of an fp8-in-memory model / the bf16 model
# max |fp8-weights output - full-precision output| / max |output| on these random tiny models
# (e4m3 keeps 3 mantissa bits: ~3% per weight; measured 0.02-0.07)
FP8_ROUNDING = 0.2
SCALED_MM = 0.1  # fp8 activations too (GPU only)
BF16_GPU = 2e-2  # compiled vs eager in bf16 on a GPU (the project's bf16 tolerance)

FAMILIES = {"flux": dict(num_double=1, num_single=2, heads=2, guidance=True),
            "sd3.5": dict(num_layers=2, heads=2, head_dim=64, qk_norm=True, dual=(0,))}


def make_peer(name, seed=0):
    return (peers.flux_peer if name == "flux" else peers.sd3_peer)(**FAMILIES[name], seed=seed)


def comfy_quant(fmt="float8_e4m3fn"):
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def scaled_fp8(original: dict, form: str, prefix: str):
    """(the file's state dict, the dequantized original-layout state dict without prefix).
    Block Linear weights (2-D, under *_blocks.) become fp8 with a per-tensor scale."""
    out, dequant = {}, {}
    for k, v in original.items():
        name = k[len(prefix):]
        if not (v.dim() == 2 and "_blocks." in name and name.endswith(".weight")):
            out[k] = v.to(torch.bfloat16)
            dequant[name] = out[k].float()
            continue
        q, scale = fp8.quantize(v)
        layer = k[:-len(".weight")]
        out[k] = q
        if form == "old":
            out[layer + ".scale_weight"] = scale.reshape(1)  # ComfyUI writes shape (1,) or ()
            if len(out) % 3 == 0:
                out[layer + ".scale_input"] = torch.ones(())
        else:
            out[layer + ".weight_scale"] = scale
            out[layer + ".comfy_quant"] = comfy_quant()
        dequant[name] = q.float() * scale
    if form == "old":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, dequant


def with_weights(peer, ours: dict):
    """A copy of the diffusers peer holding ``ours`` (original names) as its weights."""
    twin = peers.rounded(peer, torch.float32)
    twin.load_state_dict(keymaps.to_diffusers(ours, peers.family(peer), peers.hidden(peer)))
    return twin


@pytest.fixture(scope="module", params=[("flux", "old", ""), ("flux", "new", "model.diffusion_model."),
                                        ("sd3.5", "new", ""), ("sd3.5", "old", "model.diffusion_model.")],
                ids=lambda p: "-".join(p) or "no-prefix")
def scaled_file(request, tmp_path_factory):
    name, form, prefix = request.param
    peer = make_peer(name)
    sd, dequant = scaled_fp8(peers.original_state(peer, prefix), form, prefix)
    if prefix:  # other components beside the transformer, as in ComfyUI's all-in-one files
        sd.update(peers.extras(peers.family(peer)))
    path = peers.save(sd, tmp_path_factory.mktemp("fp8") / f"{name}-{form}.safetensors")
    return peer, path, dequant, prefix


def test_scaled_fp8_dequantizes_bit_exactly_and_matches_diffusers(scaled_file):
    peer, path, dequant, prefix = scaled_file
    model = load_transformer(path)  # weight_dtype unset: upcast to fp32
    own = model.state_dict()
    stored = load_file(str(path))
    exact = [k for k in dequant if f"{prefix}{k[:-len('weight')]}weight_scale" in stored
             or f"{prefix}{k[:-len('weight')]}scale_weight" in stored]
    assert exact, "the test file must hold scaled weights"
    for k in exact:  # fp8.float() * scale, to the bit
        assert torch.equal(own[k], dequant[k]), k
    err = peers.parity(model, with_weights(peer, dequant))
    print(f"\nscaled fp8 {path.name}: {err:.2e}")
    assert err <= TOL


def test_dropping_the_scales_would_be_wrong(scaled_file):
    """The scales matter: without them the weights are off by their scale factor."""
    peer, path, dequant, prefix = scaled_file
    stored = load_file(str(path))
    key = next(k for k in stored if k.endswith(".weight") and stored[k].dtype == torch.float8_e4m3fn)
    model = load_transformer(path)
    assert not torch.equal(model.state_dict()[key[len(prefix):]], stored[key].float())


def test_inspect_names_scaled_fp8(scaled_file, capsys):
    _, path, dequant, _ = scaled_file
    assert cli_main(["inspect", str(path)]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    n = sum(1 for v in load_file(str(path)).values() if v.dtype == torch.float8_e4m3fn and v.dim() == 2)
    assert lines["format"].strip() == f"scaled fp8 (ComfyUI): {n} weights stored as fp8 with a per-tensor scale"


def test_fp8_in_memory_keeps_the_files_fp8_and_scales(scaled_file):
    peer, path, dequant, prefix = scaled_file
    upcast = load_transformer(path)
    kept = load_transformer(path, weight_dtype=torch.float8_e4m3fn)  # computes in fp32
    stored = load_file(str(path))
    own = kept.state_dict()
    for k, v in stored.items():
        if v.dtype == torch.float8_e4m3fn and v.dim() == 2:  # the file's own bytes, not re-quantized
            assert torch.equal(own[k[len(prefix):]].view(torch.uint8), v.view(torch.uint8)), k
    assert peers.parity(kept, with_weights(peer, dequant)) <= TOL
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    with torch.no_grad():
        a, b = upcast(x, sigma, ctx, pooled, guidance=g), kept(x, sigma, ctx, pooled, guidance=g)
    assert ((a - b).abs().max() / a.abs().max()).item() <= SAME


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp8_in_memory_from_a_bf16_file(name, tmp_path):
    peer = make_peer(name)
    path = peers.save_original(peer, tmp_path / "m.safetensors", with_extras=False, dtype=torch.bfloat16)
    bf16 = load_transformer(path, dtype=torch.bfloat16)
    kept = load_transformer(path, dtype=torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    ratio = fp8.weight_bytes(kept) / fp8.weight_bytes(bf16)
    print(f"\n{name}: fp8 / bf16 weight bytes = {ratio:.3f}")
    assert ratio <= FP8_MEMORY
    quantized = [m for m in kept.modules() if isinstance(m, fp8.FP8Linear)]
    assert quantized and all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
                             for m in quantized)
    # the weights are the per-tensor quantization of the file's: compare with the fp32 model given them
    ref = load_transformer(path)
    for n, m in kept.named_modules():
        if isinstance(m, fp8.FP8Linear):
            q, s = fp8.quantize(ref.get_submodule(n).weight.to(torch.bfloat16))
            assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.weight_scale, s)
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    with torch.no_grad():
        out = kept(x.bfloat16(), sigma, ctx.bfloat16(), pooled.bfloat16(),
                   guidance=None if g is None else g.bfloat16())
        want = bf16(x.bfloat16(), sigma, ctx.bfloat16(), pooled.bfloat16(),
                    guidance=None if g is None else g.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = ((out - want).float().abs().max() / want.float().abs().max()).item()
    print(f"{name}: fp8 weights vs bf16 weights, output {err:.3f}")
    assert err <= FP8_ROUNDING


@pytest.mark.parametrize("preset", ["flux.1-dev", "sd3.5-large", "sd3.5-medium"])
def test_fp8_memory_of_the_official_sizes(preset):
    import mmdit

    model = mmdit.build_transformer(preset, dtype=torch.bfloat16, device="meta")
    before = fp8.weight_bytes(model)
    fp8.quantize_linears(model)
    ratio = fp8.weight_bytes(model) / before
    print(f"\n{preset}: fp8 / bf16 weight bytes = {ratio:.3f}")
    assert ratio <= FP8_MEMORY


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp8_model_works_with_the_fork_and_compiles_without_graph_breaks(name, tmp_path):
    import mmdit

    peer = make_peer(name)
    path = peers.save_original(peer, tmp_path / "m.safetensors", with_extras=False)
    model = load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    full = load_transformer(path)
    for m in (model, full):
        m.ma = mmdit.MASpec(channels=(3, 17), block=1)
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    fork = torch.tensor([False, True, True])
    with torch.no_grad():
        out = model(x, sigma, ctx, pooled, guidance=g, fork=fork)
        ref = full(x, sigma, ctx, pooled, guidance=g, fork=fork)
    assert out.shape == (5, *x.shape[1:])
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\n{name} fork: fp8 weights vs fp32 weights, output {err:.3f}")
    assert err <= FP8_ROUNDING
    layer = next(m for m in model.modules() if isinstance(m, fp8.FP8Linear))
    h = torch.randn(2, 5, layer.in_features)
    explained = torch._dynamo.explain(layer)(h)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(layer, fullgraph=True, backend="eager")(h), layer(h))
    for kw in ({}, {"fork": slice(1, None)}):  # the plain forward and the DG fork (the last rows)
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x, sigma, ctx, pooled, guidance=g, **kw).graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.gpu
def test_scaled_mm_on_gpu_is_close_to_dequant():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512).cuda().bfloat16()
    a, b = fp8.FP8Linear.from_linear(lin), fp8.FP8Linear.from_linear(lin, matmul="scaled_mm")
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16)
    ya, yb = a(x), b(x)
    assert ((ya - yb).float().abs().max() / ya.float().abs().max()).item() <= SCALED_MM


@pytest.mark.parametrize("fmt, name", [("int8_tensorwise", "int8"), ("nvfp4", "nvfp4"), ("mxfp9", "'mxfp9'")])
def test_other_comfy_quant_formats_are_named(fmt, name, tmp_path):
    peer = make_peer("flux")
    sd, _ = scaled_fp8(peers.original_state(peer, ""), "new", "")
    key = next(k for k in sd if k.endswith(".comfy_quant"))
    sd[key] = comfy_quant(fmt)
    with pytest.raises(CheckpointError, match=rf"is a ComfyUI {name} .*quantized checkpoint \(1 layers such as"):
        load_transformer(peers.save(sd, tmp_path / "q.safetensors"))


def test_fp8_in_memory_from_a_diffusers_fp8_file_keeps_its_bytes(tmp_path):
    """q / k / v stored apart (diffusers keys) join into our fused qkv without re-quantizing."""
    peer = make_peer("sd3.5")
    path = peers.save_diffusers_file(peer, tmp_path / "d.safetensors", torch.float8_e4m3fn)
    upcast, kept = load_transformer(path), load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    qkv = kept.joint_blocks[0].x_block.attn.qkv
    assert isinstance(qkv, fp8.FP8Linear) and qkv.weight_scale.item() == 1.0
    assert torch.equal(qkv.weight.float(), upcast.joint_blocks[0].x_block.attn.qkv.weight)
    assert peers.parity(kept, peers.rounded(peer, torch.float8_e4m3fn)) <= TOL


def test_row_wise_scales_are_named(tmp_path):
    peer = make_peer("flux")
    sd, _ = scaled_fp8(peers.original_state(peer, ""), "old", "")
    key = next(k for k in sd if k.endswith(".scale_weight"))
    sd[key] = torch.ones(sd[key[:-len("scale_weight")] + "weight"].shape[0], 1)
    pattern = rf"{key} has shape \({sd[key].shape[0]}, 1\) .*only per-tensor \(scalar\) and per-row \(out,\) fp8 scales"
    with pytest.raises(CheckpointError, match=pattern):
        load_transformer(peers.save(sd, tmp_path / "rows.safetensors"))


@pytest.mark.gpu
def test_fp8_in_memory_on_gpu_with_lora_eager_and_compiled(tmp_path):
    import mmdit

    peer = make_peer("flux")
    path = peers.save_original(peer, tmp_path / "m.safetensors", with_extras=False, dtype=torch.bfloat16)
    kept = load_transformer(path, dtype=torch.bfloat16, device="cuda", weight_dtype=torch.float8_e4m3fn)
    full = load_transformer(path, dtype=torch.bfloat16, device="cuda")
    assert kept.double_blocks[0].img_attn.qkv.weight.device.type == "cuda"
    x, sigma, ctx, pooled, g = (t.cuda() if t is not None else None for t in peers.inputs(peer))
    x, ctx, pooled = x.bfloat16(), ctx.bfloat16(), pooled.bfloat16()
    g2 = torch.Generator().manual_seed(3)
    lora_sd = {f"lora_unet_{n.replace('.', '_')}.{leaf}": torch.randn(shape, generator=g2) * 0.05
               for n, m in kept.named_modules() if isinstance(m, fp8.FP8Linear) and n.startswith("double_blocks.")
               for leaf, shape in (("lora_down.weight", (4, m.in_features)), ("lora_up.weight", (m.out_features, 4)))}
    for m in (kept, full):
        mmdit.apply_lora(m, lora_sd, scale=0.5)
    with torch.no_grad():
        eager, ref = kept(x, sigma, ctx, pooled, guidance=g), full(x, sigma, ctx, pooled, guidance=g)
        compiled = torch.compile(kept, fullgraph=True)(x, sigma, ctx, pooled, guidance=g)
    assert ((eager - ref).float().abs().max() / ref.float().abs().max()).item() <= FP8_ROUNDING
    assert ((compiled - eager).float().abs().max() / eager.float().abs().max()).item() <= BF16_GPU
