"""fp8: ComfyUI scaled-fp8 files load exactly, fp8 weights stay fp8 in memory, and both ways of
multiplying by them (fp8 ``torch._scaled_mm``, the default on fp8 tensor cores; dequantize, elsewhere)
match the fp32 dequantized reference within measured bounds.

Files are written in ComfyUI's two layouts (REFERENCE: comfy/ops.py, comfy/model_detection.py):
  old: <layer>.weight float8_e4m3fn + <layer>.scale_weight (fp32 scalar) + a top-level
       ``scaled_fp8`` marker (+ <layer>.scale_input on some layers)
  new: <layer>.weight float8_e4m3fn + <layer>.weight_scale + <layer>.comfy_quant (uint8 JSON)
Norms, biases and the embedders stay bf16, as in ComfyUI's files.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mmdit
from mmdit import fp8
from mmdit.cli import main as cli_main
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.transformer import load_transformer

import peers
from helpers import inputs as model_inputs, rel_err, save_safetensors, tiny

TOL = 1e-4  # fp32 parity with diffusers, relative to the output scale
SAME = 1e-6  # the same weights through two code paths
FP8_MEMORY = 0.55  # weight bytes of an fp8-in-memory model / the bf16 model
# max |fp8-weights output - full-precision output| / max |output| on these random tiny models
# (e4m3 keeps 3 mantissa bits: ~3% per weight; measured 0.02-0.07)
FP8_ROUNDING = 0.2
BF16_GPU = 2e-2  # compiled vs eager in bf16 on a GPU (the project's bf16 tolerance)
# One Linear against the fp32 dequantized reference F.linear(x, w_fp8.float() * scale, b), max|y - ref| / max|ref|:
DEQUANT_BF16 = 1e-2  # bf16 input and output: w rounded once to bf16, y rounded once (measured 4.1e-3 and 4.2e-3 per tensor and per row)
FP8_ACTIVATIONS = 0.06  # x in e4m3 with per-row scales (3 mantissa bits); measured per layer of the tiny models
#                        below: 0.024-0.037 (median 0.025); 0.029-0.032 on Gaussian inputs of width 256
EMULATED = 1e-5  # torch._scaled_mm vs its arithmetic written out in fp32 (x8 @ w8^T * sx * sw + b)

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


# ---- the two matmuls against the fp32 dequantized reference ------------------------------------

def reference(x, q, scale, bias):
    """fp32: x @ (w_fp8.float() * scale)^T + b."""
    return F.linear(x.float(), q.float() * (scale[:, None] if scale.dim() else scale), bias)


def quantized_layer(per_row: bool, K=256, N=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = fp8.quantize(torch.randn(N, K, generator=g) * 0.05, per_row=per_row)
    return q, scale, torch.randn(N, generator=g) * 0.1, torch.randn(3, 77, K, generator=g)


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_dequant_path_is_exact_in_fp32_and_rounds_once_in_bf16(per_row):
    q, scale, bias, x = quantized_layer(per_row)
    ref = reference(x, q, scale, bias)
    assert torch.equal(fp8.fp8_linear(x, q, scale, bias, "dequant"), ref)  # fp32: to the bit
    y = fp8.fp8_linear(x.bfloat16(), q, scale, bias, "dequant")
    err = rel_err(y, ref)
    print(f"\ndequant, bf16, {'per row' if per_row else 'per tensor'}: {err:.2e}")
    assert y.dtype == torch.bfloat16 and err <= DEQUANT_BF16
    # the product w * scale is taken in fp32 and rounded once: the scale itself is never rounded to bf16
    w = fp8.dequantize(q, scale, torch.bfloat16)
    assert torch.equal(w, (q.float() * fp8._rows(scale)).bfloat16())
    assert torch.equal(y, F.linear(x.bfloat16(), w, bias.bfloat16()))


def test_dequant_keeps_a_scale_that_bf16_cannot_hold():
    q = torch.tensor([[1.0, 1.5, -448.0, 0.875]]).to(fp8.FP8)
    scale = torch.tensor(1 / 3)  # 0.333333343 in fp32; bf16 holds 0.333984375
    w = fp8.dequantize(q, scale, torch.bfloat16)
    assert torch.equal(w, (q.float() * scale).bfloat16())
    assert not torch.equal(w, q.bfloat16() * scale.bfloat16())  # what rounding the scale first gives


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_scaled_mm_path_is_its_fp32_arithmetic_and_close_to_the_reference(per_row, dtype):
    """fp8 activations (torch 2.13 runs torch._scaled_mm on the CPU too): the output is exactly the
    row-quantized input times the fp8 weight, each scale applied in fp32; the error against the
    unquantized reference is x's rounding to e4m3 alone."""
    q, scale, bias, x = quantized_layer(per_row)
    x = x.to(dtype)
    y = fp8.fp8_linear(x, q, scale, bias, "scaled_mm")
    assert y.dtype == dtype and y.shape == (3, 77, 512)
    flat = x.reshape(-1, 256).float()
    sx = flat.abs().amax(dim=1, keepdim=True) / 448.0  # (M, 1)
    x8 = (flat / sx).clamp(-448, 448).to(fp8.FP8)
    emulated = (x8.float() @ q.float().t()) * sx * (scale if per_row else scale.expand(512))[None, :] + bias
    assert rel_err(y.reshape(-1, 512), emulated) <= (EMULATED if dtype == torch.float32 else DEQUANT_BF16)
    err = rel_err(y, reference(x, q, scale, bias))
    print(f"\nscaled_mm, {dtype}, {'per row' if per_row else 'per tensor'}: {err:.3f}")
    assert err <= FP8_ACTIVATIONS


def test_auto_takes_scaled_mm_on_fp8_tensor_cores_for_bf16_only(monkeypatch):
    q, scale, bias, x = quantized_layer(False)
    assert not fp8.use_scaled_mm("auto", x.bfloat16(), q)  # a CPU has no fp8 tensor cores
    monkeypatch.setattr(fp8, "fp8_tensor_cores", lambda device: True)
    assert fp8.use_scaled_mm("auto", x.bfloat16(), q) and fp8.use_scaled_mm("auto", x.half(), q)
    assert not fp8.use_scaled_mm("auto", x, q)  # fp32 asks for exactness
    assert not fp8.use_scaled_mm("auto", x[..., :40].bfloat16(), q[:, :40])  # 40 is no multiple of 16
    assert not fp8.use_scaled_mm("dequant", x.bfloat16(), q) and fp8.use_scaled_mm("scaled_mm", x, q)
    layer = fp8.FP8Linear(256, 512)
    layer.weight.data, layer.weight_scale, layer.bias.data = q, scale, bias
    assert layer.matmul == "auto"
    assert torch.equal(layer(x.bfloat16()), fp8.fp8_linear(x.bfloat16(), q, scale, bias, "scaled_mm"))


def test_fp8_tensor_cores_from_the_compute_capability(monkeypatch):
    assert not fp8.fp8_tensor_cores(torch.device("cpu"))
    for capability, fast in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((12, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8.fp8_tensor_cores(torch.device("cuda", 0)) is fast, capability
        torch._dynamo.reset()  # a constant to dynamo: no graph break where it is asked
        explained = torch._dynamo.explain(lambda t: t * fp8.fp8_tensor_cores(torch.device("cuda", 0)))(torch.ones(2))
        assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("matmul", fp8.MATMULS)
def test_each_path_is_one_graph(matmul):
    q, scale, bias, x = quantized_layer(True, K=64, N=32)
    layer = fp8.FP8Linear(64, 32, per_row=True, matmul=matmul)
    layer.weight.data, layer.weight_scale, layer.bias.data = q, scale, bias
    for h in (x[..., :64], x[..., :64].bfloat16()):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(h)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(h), layer(h))
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fp8_activation_error_per_layer_of_a_model(family):
    """Every Linear of a tiny model on its own activations (those of the fp8 model's forward):
    fp8 activations against the fp32 dequantized reference, per layer."""
    model = tiny(family)
    fp8.quantize_linears(model, matmul="scaled_mm")
    seen = {}
    hooks = [m.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
             for n, m in model.named_modules() if isinstance(m, fp8.FP8Linear)]
    x, sigma, ctx, pooled, g = model_inputs(model)
    with torch.no_grad():
        model(x, sigma, ctx, pooled, guidance=g)
    for h in hooks:
        h.remove()
    errors = {n: rel_err(out, reference(inp, m.weight, m.weight_scale, m.bias))
              for n, (inp, out) in seen.items() for m in [model.get_submodule(n)]}
    assert len(errors) == len(fp8.linear_names(tiny(family)))
    worst = max(errors, key=errors.get)
    print(f"\n{family}: fp8 activations, {len(errors)} layers: max {errors[worst]:.3f} ({worst}), "
          f"median {sorted(errors.values())[len(errors) // 2]:.3f}")
    assert errors[worst] <= FP8_ACTIVATIONS


# ---- on a GPU --------------------------------------------------------------------------------

def flux_file(tmp_path, dtype=torch.bfloat16):
    """A tiny FLUX.1 (our names are BFL's) saved in ``dtype``; no diffusers needed."""
    model = tiny("flux")
    return save_safetensors({k: v.to(dtype) for k, v in model.state_dict().items()}, tmp_path / "flux.safetensors")


FLUX_AXES = {"axes_dim": (4, 6, 6)}  # not readable from a head_dim-16 file's shapes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_in_memory_with_lora_eager_and_compiled(device, tmp_path):
    """Loaded with fp8 weights (on CUDA >= 8.9 the default multiplies in fp8), LoRAs on the fp8
    Linears; eager against the bf16 model, compiled against eager."""
    path = flux_file(tmp_path)
    kw = dict(dtype=torch.bfloat16, device=device, config=FLUX_AXES)
    kept = load_transformer(path, weight_dtype=torch.float8_e4m3fn, **kw)
    full = load_transformer(path, **kw)
    assert kept.double_blocks[0].img_attn.qkv.weight.device.type == device
    x, sigma, ctx, pooled, g = (t.to(device) for t in model_inputs(kept))
    x, ctx, pooled, g = x.bfloat16(), ctx.bfloat16(), pooled.bfloat16(), g.bfloat16()
    g2 = torch.Generator().manual_seed(3)
    lora_sd = {f"lora_unet_{n.replace('.', '_')}.{leaf}": torch.randn(shape, generator=g2) * 0.05
               for n, m in kept.named_modules() if isinstance(m, fp8.FP8Linear) and n.startswith("double_blocks.")
               for leaf, shape in (("lora_down.weight", (4, m.in_features)), ("lora_up.weight", (m.out_features, 4)))}
    for m in (kept, full):
        mmdit.apply_lora(m, lora_sd, scale=0.5)
    with torch.no_grad():
        eager, ref = kept(x, sigma, ctx, pooled, guidance=g), full(x, sigma, ctx, pooled, guidance=g)
        torch._dynamo.reset()
        compiled = torch.compile(kept, fullgraph=True, **({} if device == "cuda" else {"backend": "aot_eager"}))(
            x, sigma, ctx, pooled, guidance=g)
    torch._dynamo.reset()
    assert rel_err(eager, ref) <= FP8_ROUNDING
    assert rel_err(compiled, eager) <= BF16_GPU


@pytest.mark.gpu
def test_fp8_tensor_cores_multiply_in_fp8_by_default():
    """On compute capability >= 8.9 a bf16 input takes torch._scaled_mm unasked; elsewhere dequant."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512).cuda().bfloat16()
    layer = fp8.FP8Linear.from_linear(lin)
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16)
    fast = torch.cuda.get_device_capability() >= (8, 9)
    assert fp8.use_scaled_mm(layer.matmul, x, layer.weight) is fast
    way = "scaled_mm" if fast else "dequant"
    y = layer(x)
    assert torch.equal(y, fp8.fp8_linear(x, layer.weight, layer.weight_scale, layer.bias, way))
    assert rel_err(y, reference(x, layer.weight, layer.weight_scale, layer.bias)) <= (
        FP8_ACTIVATIONS if fast else DEQUANT_BF16)
    torch._dynamo.reset()
    assert rel_err(torch.compile(layer, fullgraph=True)(x), y) <= BF16_GPU
    torch._dynamo.reset()
