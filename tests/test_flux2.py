"""FLUX.2 ([dev], [klein]): ours equals diffusers' ``Flux2Transformer2DModel`` on the same weights, in
every checkpoint layout people have; key maps, detection, fp8 (per tensor and per row), inspect.

The rows, branches and one-graph tests of the other families, for FLUX.2, are in test_flux2_rows.py.
"""
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmdit
from mmdit import fp8
from mmdit.cli import main as cli_main
from mmdit.weights import inspect as inspect_mod
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect
from mmdit.weights.transformer import load_transformer

import peers
import peers_flux2 as P

TOL = 1e-5  # fp32 parity, max|ours - peer| / max|peer|
SAME = 1e-6  # the same weights through two code paths
DEV = dict(num_double=1, num_single=2, heads=2, guidance=True)
KLEIN = dict(num_double=2, num_single=1, heads=1, guidance=False)
REFS = {"no-ref": (), "one-ref": ((1, 4, 3),), "two-refs": ((3, 4, 3), (1, 2, 5))}  # (rows, h_i, w_i)
PRESETS = list(P.FULL)
# tensors per file, BFL / diffusers (docs/architecture.md)
TENSOR_COUNTS = {"flux.2-dev": (299, 331), "flux.2-klein-4b": (149, 169), "flux.2-klein-9b": (201, 233)}


# ---- the model: parity with diffusers, with and without guidance and reference images ------

@pytest.mark.parametrize("refs", list(REFS))
@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_outputs_match_diffusers(variant, refs):
    """Tiny widths (head_dim 16, axes (4, 4, 4, 4), 16 input channels), 2 double + 2 single blocks."""
    peer = P.flux2_peer(num_double=2, num_single=2, heads=2, head_dim=16, in_channels=16,
                        guidance=variant == "dev")
    model = mmdit.build_transformer("flux.2-dev" if variant == "dev" else "flux.2-klein-4b", device="meta",
                                    **{**P.TINY, "context_dim": 32})
    model.load_state_dict(keymaps.from_diffusers(P.diffusers_state(peer), "flux2", P.hidden(peer)), assign=True)
    err = P.parity(model.eval(), peer, refs=REFS[refs])
    print(f"\n{variant} {refs}: {err:.2e}")
    assert err <= TOL


def test_dev_without_guidance_and_bad_inputs_are_clear_errors():
    model = P.tiny()
    x, sigma, ctx, g, _ = P.tiny_inputs(model)
    with pytest.raises(ValueError, match="guidance-distilled.*pass guidance"):
        model(x, sigma, ctx)
    with pytest.raises(ValueError, match=r"takes x \(B, 16, h, w\) and context \(B, L, 24\)"):
        model(x, sigma, ctx[..., :8], guidance=g)
    with pytest.raises(ValueError, match=r"reference latent must be \(B or 1, 16, h_i, w_i\)"):
        model(x, sigma, ctx, guidance=g, refs=(torch.zeros(2, 16, 3, 3),))


def test_rows_are_independent_and_references_are_per_row():
    model = P.tiny(guidance=False)
    x, sigma, ctx, _, refs = P.tiny_inputs(model, refs=((3, 2, 2), (1, 3, 2)))
    with torch.no_grad():
        full = model(x, sigma, ctx, refs=refs)
        one = model(x[1:2], sigma[1:2], ctx[1:2], refs=(refs[0][1:2], refs[1]))
        plain = model(x, sigma, ctx)
    assert full.shape == x.shape
    assert P.rel(full[1:2], one) <= TOL
    assert P.rel(full, plain) > 1e-3  # the references matter


# ---- checkpoints in every layout -----------------------------------------------------------

def write_bfl(peer, tmp):  # BFL flux-2-*.safetensors: no prefix, nothing else
    return P.save(P.bfl_state(peer), tmp / "flux-2.safetensors")


def write_comfy(peer, tmp):  # ComfyUI all-in-one: prefix + other components beside it
    return P.save({**P.bfl_state(peer, "model.diffusion_model."), **peers.extras("flux")}, tmp / "comfy.safetensors")


def write_comfy_unet(peer, tmp):  # diffusion_model. + BFL names
    return P.save(P.bfl_state(peer, "diffusion_model."), tmp / "unet.safetensors")


def write_diffusers_file(peer, tmp):  # diffusers names in one file, no config.json
    return P.save(P.diffusers_state(peer), tmp / "diffusers_keys.safetensors")


def write_sharded(peer, tmp):  # a pipeline folder, transformer/ sharded with its index
    folder = tmp / "pipe"
    peer.save_pretrained(str(folder / "transformer"), max_shard_size="1MB")
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    assert (folder / "transformer/diffusion_pytorch_model.safetensors.index.json").exists()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "Flux2Pipeline" if peer.config.guidance_embeds else "Flux2KleinPipeline",
         "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    return folder


LAYOUTS = {"bfl": write_bfl, "comfy-prefixed": write_comfy, "diffusion_model-prefixed": write_comfy_unet,
           "diffusers-file": write_diffusers_file, "diffusers-sharded": write_sharded}
EXPECT = {"bfl": ("original", ""), "comfy-prefixed": ("original", "model.diffusion_model."),
          "diffusion_model-prefixed": ("original", "diffusion_model."), "diffusers-file": ("diffusers", ""),
          "diffusers-sharded": ("diffusers", "")}


@pytest.mark.parametrize("variant", ["dev", "klein"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_and_matches_diffusers(layout, variant, tmp_path):
    peer = P.flux2_peer(**(DEV if variant == "dev" else KLEIN))
    model = load_transformer(LAYOUTS[layout](peer, tmp_path))
    assert (model.detected.layout, model.detected.prefix, model.config.family) == (*EXPECT[layout], "flux2")
    assert model.config.guidance_embed == (variant == "dev")
    assert model.detected.config_source == ("config.json" if layout == "diffusers-sharded" else "shapes")
    err = P.parity(model, peer, refs=REFS["one-ref"])
    print(f"\n{layout} {variant}: {err:.2e}")
    assert err <= TOL


def test_bfl_file_reads_back_through_diffusers_converter(tmp_path):
    """The proof of the BFL layout: diffusers' own converter turns the file we write (its prefix
    stripped: the converter does not) into exactly the peer's state dict."""
    for variant in (DEV, KLEIN):
        peer = P.flux2_peer(**variant)
        for prefix in ("", "model.diffusion_model."):
            sd = load_file(str(P.save(P.bfl_state(peer, prefix), tmp_path / "f.safetensors")))
            converted = P.diffusers_convert({k[len(prefix):]: v for k, v in sd.items()})
            want = P.diffusers_state(peer)
            assert converted.keys() == want.keys()
            assert all(torch.equal(converted[k], want[k]) for k in want)


def test_hub_ids_load_from_the_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    peer = P.flux2_peer(**KLEIN)  # a diffusers repo of which only transformer/ was downloaded
    folder = write_sharded(peer, tmp_path)
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    peers.fake_hub_cache(cache, "org/klein-tiny", files, not_downloaded=("vae/diffusion_pytorch_model.safetensors",))
    model = load_transformer("org/klein-tiny")
    assert model.detected.config_source == "config.json" and P.parity(model, peer) <= TOL
    peer = P.flux2_peer(**DEV)  # a BFL single-file repo: the transformer file, not ae.safetensors
    peers.fake_hub_cache(cache, "org/dev-tiny", {"flux2-dev.safetensors": write_bfl(peer, tmp_path),
                                                 "ae.safetensors": tmp_path / "junk.safetensors"})
    assert P.parity(load_transformer("org/dev-tiny"), peer) <= TOL


def test_strict_load_names_the_key(tmp_path):
    sd = P.bfl_state(P.flux2_peer(**DEV), "model.diffusion_model.")
    key = "model.diffusion_model.single_blocks.1.linear2.weight"
    path = P.save({k: v for k, v in sd.items() if k != key}, tmp_path / "f.safetensors")
    with pytest.raises(CheckpointError, match=rf"(?s)original, prefix 'model.diffusion_model.', flux2.*"
                                              rf"missing 1 key\(s\): {key} \(256, 1024\)"):
        load_transformer(path)
    bias = {"model.diffusion_model.img_in.bias": torch.zeros(256)}  # FLUX.2 has no biases
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): model.diffusion_model.img_in.bias"):
        load_transformer(P.save({**sd, **bias}, tmp_path / "g.safetensors"))


def test_head_dim_other_than_128_needs_axes(tmp_path):
    peer = P.flux2_peer(num_double=1, num_single=1, heads=2, head_dim=16, in_channels=16)
    path = write_bfl(peer, tmp_path)
    with pytest.raises(CheckpointError, match=r"axes_dim.*\(32, 32, 32, 32\) only for head_dim 128"):
        load_transformer(path)
    assert P.parity(load_transformer(path, config={"axes_dim": (4, 4, 4, 4)}), peer) <= TOL


# ---- key maps and detection at the official sizes (on meta) --------------------------------

def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_maps_match_our_model_and_diffusers_converter(name):
    dsd, _ = P.full_size(name)
    cfg = mmdit.preset(name)
    ours = keymaps.from_diffusers(dsd, "flux2", cfg.hidden_size)
    assert shapes(ours) == shapes(mmdit.build_transformer(name, device="meta").state_dict())
    assert shapes(keymaps.to_diffusers(ours, "flux2", cfg.hidden_size)) == shapes(dsd)
    assert shapes(P.diffusers_convert(ours)) == shapes(dsd)
    assert (len(ours), len(dsd)) == TENSOR_COUNTS[name]


def test_key_maps_round_trip_both_ways():
    model = P.tiny()
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    H = model.config.hidden_size
    back = keymaps.from_diffusers(keymaps.to_diffusers(ours, "flux2", H), "flux2", H)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    peer = P.flux2_peer(**KLEIN)
    dsd = P.diffusers_state(peer)
    again = keymaps.to_diffusers(keymaps.from_diffusers(dsd, "flux2", P.hidden(peer)), "flux2", P.hidden(peer))
    assert again.keys() == dsd.keys() and all(torch.equal(again[k], dsd[k]) for k in dsd)
    # only the final layer's halves swap; the shared 6-chunk modulation is copied
    w = ours["final_layer.adaLN_modulation.1.weight"]
    there = keymaps.to_diffusers(ours, "flux2", H)
    assert torch.equal(there["norm_out.linear.weight"], torch.cat([w[H:], w[:H]]))
    assert torch.equal(there["double_stream_modulation_img.linear.weight"],
                       ours["double_stream_modulation_img.lin.weight"])


@pytest.mark.parametrize("name", PRESETS)
def test_every_official_variant_is_detected(name):
    dsd, config = P.full_size(name)
    cfg = mmdit.preset(name)
    ours = shapes(keymaps.from_diffusers(dsd, "flux2", cfg.hidden_size))
    comfy = {**{"model.diffusion_model." + k: s for k, s in ours.items()}, **peers.FLUX_EXTRAS}
    for layout, prefix, sd in [("diffusers", "", shapes(dsd)), ("original", "", ours),
                               ("original", "model.diffusion_model.", comfy)]:
        det = detect(sd)
        assert (det.layout, det.prefix, det.family, det.preset, det.config_source) == \
            (layout, prefix, "flux2", name, "shapes")
    det = detect(shapes(dsd), config_json={**config, "_class_name": "Flux2Transformer2DModel"})
    assert det.config_source == "config.json" and det.preset == name


def test_flux1_files_are_not_taken_for_flux2():
    det = detect(shapes(peers.diffusers_state(peers.flux_peer(guidance=False))))
    assert det.family == "flux"
    det = detect(shapes(peers.original_state(peers.flux_peer(), "")))
    assert det.family == "flux"


# ---- fp8: ComfyUI per-tensor scales and BFL per-row (fp8r) scales --------------------------

def fp8_file(peer, per_row: bool, tmp) -> tuple[Path, dict]:
    """Block Linear weights in fp8 with their scales (fp8r: ``weight_scale`` (out,); ComfyUI:
    a scalar ``weight_scale`` + ``input_scale`` + ``comfy_quant``), the rest bf16. Returns the
    file and the dequantized state dict in our names."""
    out, dequant = {}, {}
    for k, v in P.bfl_state(peer).items():
        if v.dim() == 2 and "_blocks." in k:
            q, scale = fp8.quantize(v, per_row=per_row)
            layer = k[:-len(".weight")]
            out[k], out[layer + ".weight_scale"] = q, scale
            if not per_row:
                out[layer + ".input_scale"] = torch.ones(())
                out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            dequant[k] = q.float() * (scale[:, None] if per_row else scale)
        else:
            out[k] = v.to(torch.bfloat16)
            dequant[k] = out[k].float()
    return P.save(out, tmp / ("fp8r.safetensors" if per_row else "fp8.safetensors")), dequant


def with_weights(peer, ours: dict):
    twin = peers.rounded(peer, torch.float32)
    twin.load_state_dict(keymaps.to_diffusers(ours, "flux2", P.hidden(peer)))
    return twin


@pytest.mark.parametrize("per_row", [False, True], ids=["per-tensor", "per-row"])
def test_fp8_files_load_dequantized_and_stay_fp8_in_memory(per_row, tmp_path):
    peer = P.flux2_peer(**DEV)
    path, dequant = fp8_file(peer, per_row, tmp_path)
    model = load_transformer(path)
    own = model.state_dict()
    assert all(torch.equal(own[k], dequant[k]) for k in dequant)  # fp8.float() * scale, to the bit
    assert P.parity(model, with_weights(peer, dequant)) <= TOL
    kept = load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    stored = load_file(str(path))
    qkv = kept.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, fp8.FP8Linear) and qkv.weight_scale.shape == ((768,) if per_row else ())
    for k, v in stored.items():
        if v.dtype == torch.float8_e4m3fn:  # the file's own bytes and scales, not re-quantized
            layer = kept.get_submodule(k[:-len(".weight")])
            assert torch.equal(layer.weight.view(torch.uint8), v.view(torch.uint8)), k
            assert torch.equal(layer.weight_scale, stored[k[:-len("weight")] + "weight_scale"]), k
    x, sigma, ctx, g, refs = P.inputs(peer)
    with torch.no_grad():
        assert P.rel(kept(x, sigma, ctx, guidance=g), model(x, sigma, ctx, guidance=g)) <= SAME


def test_fp8r_matches_diffusers_bfl_quantizer(tmp_path):
    """diffusers reads BFL fp8r single files itself (``BFLQuantizationConfig``): same output."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.quantizers.quantization_config import BFLQuantizationConfig

    peer = P.flux2_peer(**KLEIN)
    path, _ = fp8_file(peer, True, tmp_path)
    peer.save_pretrained(str(tmp_path / "config"))
    theirs = Flux2Transformer2DModel.from_single_file(
        str(path), config=str(tmp_path / "config"), torch_dtype=torch.float32,
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.float32))
    for model in (load_transformer(path), load_transformer(path, weight_dtype=torch.float8_e4m3fn)):
        err = P.parity(model, theirs, refs=REFS["one-ref"])
        print(f"\nfp8r vs diffusers' BFL quantizer: {err:.2e}")
        assert err <= TOL


def test_fp8r_split_into_diffusers_parts_keeps_its_row_scales(tmp_path):
    """A per-row file in diffusers names: q, k and v come with their own rows' scales, which the
    loader joins with the rows (weight_dtype=fp8) or applies before joining (upcast)."""
    peer = P.flux2_peer(**KLEIN)
    out, dequant = {}, {}
    for k, v in P.diffusers_state(peer).items():
        if v.dim() == 2 and ("attn.to_" in k or "attn.add_" in k):
            q, scale = fp8.quantize(v, per_row=True)
            out[k], out[k[:-len("weight")] + "weight_scale"] = q, scale
            dequant[k] = q.float() * scale[:, None]
        else:
            out[k] = dequant[k] = v
    path = P.save(out, tmp_path / "d.safetensors")
    ref = peers.rounded(peer, torch.float32)
    ref.load_state_dict(dequant)
    for kw in ({}, {"weight_dtype": torch.float8_e4m3fn}):
        assert P.parity(load_transformer(path, **kw), ref) <= TOL


def test_lora_fused_into_per_row_fp8_keeps_row_scales(tmp_path):
    peer = P.flux2_peer(**DEV)
    path, _ = fp8_file(peer, True, tmp_path)
    model = load_transformer(path, weight_dtype=torch.float8_e4m3fn)
    qkv = model.double_blocks[0].img_attn.qkv
    before = qkv.weight.clone(), qkv.weight_scale.clone()
    g = torch.Generator().manual_seed(0)
    sd = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 256, generator=g) * 0.05,
          "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(768, 4, generator=g) * 0.05}
    want = qkv.dequantized() + sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"] @ \
        sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    handle = mmdit.apply_lora(model, sd, fuse=True)
    assert qkv.weight_scale.shape == (768,)
    got = qkv.dequantized()
    assert ((got - want).abs() / want.abs().amax(1, keepdim=True)).max() <= 2 ** -3  # e4m3 rounding, per row
    handle.remove()
    assert torch.equal(qkv.weight.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(qkv.weight_scale, before[1])


# ---- mmdit inspect ------------------------------------------------------------------------

class HeaderOnly(Mapping):
    """A checkpoint of which only names, shapes and dtypes are known (an official size, no data)."""

    def __init__(self, shapes: dict, name: str):
        self.shapes, self.files = shapes, [Path(name)]

    def __getitem__(self, k):
        raise AssertionError(f"inspect must not read tensors ({k})")

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def shape(self, k):
        return self.shapes[k]

    def dtype(self, k):
        return "BF16"

    def metadata(self):
        return {}

    def nbytes(self):
        return 2 * sum(math.prod(s) for s in self.shapes.values())


class FakeSource:
    def __init__(self, ckpt):
        self.ckpt, self.path, self.config_json = ckpt, ckpt.files[0], None

    def open(self):
        return self.ckpt


def inspect_lines(capsys, path) -> dict:
    assert cli_main(["inspect", str(path)]) == 0
    return {k: v.strip() for k, v in (line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())}


@pytest.mark.parametrize("name", PRESETS)
def test_inspect_names_flux2_and_the_preset(name, capsys, monkeypatch):
    dsd, _ = P.full_size(name)
    ours = shapes(keymaps.from_diffusers(dsd, "flux2", mmdit.preset(name).hidden_size))
    ckpt = HeaderOnly(ours, f"{name}.safetensors")
    monkeypatch.setattr(inspect_mod, "resolve", lambda source, **kw: FakeSource(ckpt))
    lines = inspect_lines(capsys, ckpt.files[0])
    assert (lines["layout"], lines["family"], lines["preset"]) == ("original", "FLUX.2", name)
    n = sum(p.numel() for p in mmdit.build_transformer(name, device="meta").parameters())
    assert lines["parameters"] == f"{n:,}"


def test_inspect_names_the_fp8_scaling(tmp_path, capsys):
    peer = P.flux2_peer(**KLEIN)  # 2 double blocks of 8 Linears, 1 single block of 2: 18 fp8 weights
    for per_row, what in ((True, "fp8 with per-row scales (BFL fp8r): 18 weights stored as fp8 with a per-row scale"),
                          (False, "scaled fp8 (ComfyUI): 18 weights stored as fp8 with a per-tensor scale")):
        path, _ = fp8_file(peer, per_row, tmp_path)
        lines = inspect_lines(capsys, path)
        assert (lines["family"], lines["format"]) == ("FLUX.2", what)
