"""GGUF: a strict reader, exact dequantization, weights kept quantized, and ``mmdit quantize``.

Files are written with gguf-py (the reference; ``tests/peers_gguf.py``) in ComfyUI-GGUF's layout:
original names, with or without ``model.diffusion_model.``, small and 1-D tensors F32, the
embedders and final layer BF16 / F16, 2-D weights quantized (K and IQ types: random valid
blocks, which gguf-py cannot quantize to). The truth for every value is
``gguf.quants.dequantize``. diffusers' ``GGUFQuantizationConfig`` path is the end-to-end peer.
"""
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs gguf-py, the reference reader (pip install -e '.[test]')")
T = gguf.GGMLQuantizationType

import mmdit  # noqa: E402
from mmdit import fp8, ggml  # noqa: E402
from mmdit.cli import QUANT_TYPES, main as cli_main  # noqa: E402
from mmdit.lora import LoRALinear  # noqa: E402
from mmdit.weights import keymaps  # noqa: E402
from mmdit.weights.checkpoint import CheckpointError  # noqa: E402
from mmdit.weights.detect import detect  # noqa: E402
from mmdit.weights.gguf import GGUFCheckpoint, GGUFError, GGUFFile  # noqa: E402
from mmdit.weights.gguf_write import ARCH, TARGETS, tensor_type, write_gguf  # noqa: E402
from mmdit.weights.transformer import keep_quantized, load_transformer  # noqa: E402

import peers  # noqa: E402
import peers_gguf as pg  # noqa: E402

TOL = 1e-5  # fp32 parity, max|a - b| / max|b| of the velocities
# diffusers dequantizes Q*/K types in fp16 arithmetic (d.view(fp16) * q stays fp16), ours in fp32
# as gguf-py does; their outputs differ by that rounding (measured 1.9e-4 .. 3.1e-4 on these models)
DIFFUSERS_FP16_DEQUANT = 1e-3
MEMORY = 1.05  # resident weight bytes / the file's tensor bytes
Q8_0_DISTANCE = 0.02  # Q8_0 output vs the full-precision model (bf16 file), relative; measured below
FAMILIES = {"flux": dict(num_double=1, num_single=2, heads=2),
            "sd3.5": dict(num_layers=2, heads=4, head_dim=64, qk_norm=True, dual=(0,))}  # hidden 256: K-quant rows


def make_peer(name, seed=0):
    return (peers.flux_peer if name == "flux" else peers.sd3_peer)(**FAMILIES[name], seed=seed)


def arch(peer):
    return "flux" if peers.family(peer) == "flux" else "sd3"


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def twin(peer, values):
    """The diffusers peer holding ``values`` (original names, fp32): what the file holds."""
    out = peers.rounded(peer, torch.float32)
    out.load_state_dict(keymaps.to_diffusers(values, peers.family(peer), peers.hidden(peer)))
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def peer(request):
    return make_peer(request.param)


# ---- the block formats ---------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [q for q in pg.ALL if q not in ("BF16", "F16", "F32")])
def test_dequantize_equals_gguf_bit_for_bit(qtype):
    t = ggml.TYPES[qtype]
    for rows, blocks in ((1, 1), (3, 5), (7, 3)):  # odd sizes
        data = pg.random_blocks(qtype, rows * blocks, seed=rows).reshape(rows, blocks * t.size)
        want = gguf.quants.dequantize(data, T[qtype])
        got = ggml.dequantize(torch.from_numpy(data.copy()), qtype)
        assert got.shape == want.shape == (rows, blocks * t.block)
        assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32)), qtype


@pytest.mark.parametrize("qtype", ["BF16", "F16", "F32"])
def test_plain_types_read_exactly(qtype):
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32) * 100
    data = gguf.quants.quantize(x, T[qtype])
    stored = torch.from_numpy(data.copy())
    if qtype == "BF16":
        stored = stored.view(torch.bfloat16)
    want = gguf.quants.dequantize(data, T[qtype])
    assert np.array_equal(ggml.dequantize(stored, qtype).numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q3_K"])
def test_k_quant_six_bit_scales_every_value(qtype):
    """Blocks whose quants are all 1 decode to their sub-block scale (d = 1, dmin = 0) or minus
    their sub-block min (d = 0, dmin = 1): every 6-bit value in every slot, packed by the
    per-index rule of the notes (ggml's ``get_scale_min_k4``; Q3_K's low nibbles + high pairs)."""
    t = ggml.TYPES[qtype]
    n = 64
    rows = np.arange(n)[:, None]
    one = np.array([1], np.float16).view(np.uint8)
    b = np.zeros((n, t.size), np.uint8)
    if qtype == "Q3_K":  # hmask @0 all set (no offset), 2-bit q = 1 @32, scales @96, d @108
        b[:, 0:32], b[:, 32:96], b[:, 108:110] = 255, 0x55, one
        want = (rows + 5 * np.arange(16)) % 64  # every 6-bit value in every sub-block
        for j in range(16):
            b[:, 96 + j % 8] |= ((want[:, j] & 15) << 4 * (j // 8)).astype(np.uint8)
            b[:, 104 + j % 4] |= ((want[:, j] >> 4) << 2 * (j // 4)).astype(np.uint8)
        cases = [(b, want - 32)]
    else:  # d @0, dmin @2, scales @4, nibbles of 1 (Q5_K: high bits @16 zero)
        b[:, 48 if qtype == "Q5_K" else 16:] = 0x11
        sc, mn = (rows + 7 * np.arange(8)) % 64, (5 * rows + np.arange(8)) % 64
        for j in range(8):
            if j < 4:
                b[:, 4 + j] |= sc[:, j].astype(np.uint8)
                b[:, 8 + j] |= mn[:, j].astype(np.uint8)
            else:
                b[:, 12 + j - 4] |= ((sc[:, j] & 15) | ((mn[:, j] & 15) << 4)).astype(np.uint8)
                b[:, 4 + j - 4] |= ((sc[:, j] >> 4) << 6).astype(np.uint8)
                b[:, 8 + j - 4] |= ((mn[:, j] >> 4) << 6).astype(np.uint8)
        scale_only, min_only = b.copy(), b.copy()
        scale_only[:, 0:2], min_only[:, 2:4] = one, one
        cases = [(scale_only, sc), (min_only, -mn)]
    for blocks, per_sub in cases:
        got = ggml.dequantize(torch.from_numpy(blocks), qtype).reshape(n, per_sub.shape[1], -1)
        assert torch.equal(got, torch.from_numpy(per_sub).float()[:, :, None].expand_as(got))
        assert np.array_equal(got.reshape(n, -1).numpy(), gguf.quants.dequantize(blocks, T[qtype]))


@pytest.mark.parametrize("qtype", TARGETS + ("F32",))
def test_quantize_equals_gguf_bit_for_bit(qtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 96)) * rng.uniform(1e-4, 30, (7, 1))).astype(np.float32)
    x[0, :32] = 0  # a zero block
    x[1, 7] = -np.abs(x[1, :32]).max()  # the largest magnitude twice, once negative
    x[2, 40:64] = x[2, 32]  # a flat stretch
    if qtype in ("BF16", "F16", "F32"):
        x[3, :6] = [np.nan, np.inf, -np.inf, 1e-40, 7e4, -0.0]
    with np.errstate(over="ignore", invalid="ignore"):  # 7e4 overflows fp16: on purpose
        want = gguf.quants.quantize(x, T[qtype])
    got = ggml.quantize(torch.from_numpy(x), qtype)
    assert got.dtype == ggml.PLAIN.get(qtype, torch.uint8)
    assert np.array_equal(got.view(torch.uint8).numpy(), np.ascontiguousarray(want).view(np.uint8)), qtype


def test_quantize_needs_whole_blocks():
    with pytest.raises(ValueError, match="Q8_0 needs rows that are a multiple of 32"):
        ggml.quantize(torch.zeros(2, 40), "Q8_0")
    with pytest.raises(ValueError, match="quantizing to Q4_K is not supported"):
        ggml.quantize(torch.zeros(2, 256), "Q4_K")
    assert QUANT_TYPES == TARGETS


# ---- the reader ----------------------------------------------------------------------------

def test_reader_agrees_with_gguf_reader(tmp_path):
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(path=None, arch="flux")
    w.add_uint8("t.u8", 200), w.add_int8("t.i8", -5), w.add_uint16("t.u16", 60000), w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 2 ** 31 + 5), w.add_int32("t.i32", -7), w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2 ** 40), w.add_int64("t.i64", -(2 ** 40)), w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True), w.add_string("t.str", "héllo"), w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.strs", ["a", "bc"]), w.add_custom_alignment(64)
    tensors = {"w.q8": ("Q8_0", (5, 64)), "w.k4": ("Q4_K", (2, 512)), "w.bf16": ("BF16", (3, 7)),
               "w.f16": ("F16", (2, 3, 5)), "w.f32": ("F32", (9,)), "w.iq4": ("IQ4_XS", (1, 256)),
               "w.5d": ("F32", (2, 1, 3, 2, 2))}  # ComfyUI-GGUF's fix_5d_tensors.py writes 5-D ones
    for i, (name, (q, shape)) in enumerate(tensors.items()):
        w.add_tensor(name, pg.encode(rng.standard_normal(shape).astype(np.float32), q, seed=i), raw_dtype=T[q])
    path = tmp_path / "mixed.gguf"
    w.write_header_to_file(path=path), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.version == 3 and ours.alignment == 64 and ours.architecture == "flux"
    for field in ref.fields.values():
        if not field.name.startswith("GGUF."):
            assert ours.metadata[field.name] == field.contents(), field.name
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist())) == tensors[t.name][1]
        assert info.type.name == t.tensor_type.name and info.start == t.data_offset and info.nbytes == t.n_bytes
        stored = ours.stored(t.name).view(torch.uint8).numpy().reshape(-1)
        assert np.array_equal(stored, t.data.view(np.uint8).reshape(-1))
        values = GGUFCheckpoint(path)[t.name]
        assert np.array_equal(values.numpy(), gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape))


def test_our_writer_is_byte_identical_to_gguf_writer(tmp_path):
    rng = np.random.default_rng(4)
    tensors = [("x.q8", "Q8_0", (4, 64)), ("x.q5", "Q5_1", (3, 32)), ("x.bf", "BF16", (2, 5)), ("x.f32", "F32", (7,)),
               ("x.f16", "F16", (1, 8, 3)), ("x.q4", "Q4_0", (2, 96))]
    data = {n: rng.standard_normal(s).astype(np.float32) for n, _, s in tensors}
    w = gguf.GGUFWriter(path=None, arch="sd3")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION), w.add_file_type(7)
    for n, q, _ in tensors:
        w.add_tensor(n, gguf.quants.quantize(data[n], T[q]), raw_dtype=T[q])
    w.write_header_to_file(path=tmp_path / "ref.gguf"), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    write_gguf(tmp_path / "ours.gguf", "sd3", 7,
               [(n, q, s, lambda n=n: torch.from_numpy(data[n])) for n, q, s in tensors])
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


Q8 = 8  # GGML type ids used below
MALFORMED = {  # what: (raw_gguf arguments, the one-line message)
    "wrong magic": (dict(magic=b"GGML"), r"is not a GGUF file \(it starts with b'GGML'"),
    "version 1": (dict(version=1), r"GGUF file of version 1; mmdit reads versions 2 and 3 \(v1 files"),
    "version 4": (dict(version=4), r"GGUF file of version 4; mmdit reads versions 2 and 3"),
    "big-endian": (dict(endian=">"), r"is a big-endian GGUF \(written with --bigendian\)"),
    "truncated header": (dict(cut=20), r"is truncated: .*less than a GGUF header"),
    "truncated metadata": (dict(cut=60), r"is truncated: it ends inside the value of 'general.architecture'"),
    "truncated data": (dict(cut=200), r"is truncated: tensor 'b' ends at byte"),
    "duplicate key": (dict(kvs=[pg.kv("k", 4, struct.pack("<I", 1))] * 2), r"metadata key 'k' appears twice"),
    "duplicate tensor": (dict(infos=[("a", [4], 0, 0), ("a", [4], 0, 32)]), r"tensor 'a' appears twice"),
    "nested array": (dict(kvs=[pg.kv("n", 9, struct.pack("<IQ", 9, 0))]), r"'n' is an array of arrays"),
    "unknown value type": (dict(kvs=[pg.kv("u", 13, b"")]), r"'u' has value type 13, not a GGUF type"),
    "bool of 2": (dict(kvs=[pg.kv("b", 7, b"\x02")]), r"'b' is a BOOL holding 2"),
    "alignment int32": (dict(kvs=[pg.kv("general.alignment", 5, struct.pack("<i", 32))]),
                        r"general.alignment is 32 \(INT32\); it must be a UINT32 power of two"),
    "alignment 48": (dict(kvs=[pg.kv("general.alignment", 4, struct.pack("<I", 48))]), r"general.alignment is 48"),
    "unknown ggml type": (dict(infos=[("a", [4], 4, 0)]), r"tensor 'a' is stored as unknown GGML type id 4"),
    "unread ggml type": (dict(infos=[("a", [256], 16, 0)]), r"stored as GGML type IQ2_XXS, which mmdit does not read"),
    "ragged rows": (dict(infos=[("b", [40, 2], Q8, 0)]), r"'b' has rows of 40 values, not a multiple of the Q8_0"),
    "misaligned offset": (dict(infos=[("a", [4], 0, 0), ("b", [32, 2], Q8, 16)]),
                          r"'b' has data offset 16, expected 32"),
    "out of order": (dict(infos=[("b", [32, 2], Q8, 32), ("a", [4], 0, 0)]), r"'b' has data offset 32, expected 0"),
    "no dimensions": (dict(infos=[("a", [], 0, 0)]), r"tensor 'a' has 0 dimensions"),
    "six dimensions": (dict(infos=[("a", [1] * 6, 0, 0)]), r"tensor 'a' has 6 dimensions"),
    "bad utf-8": (dict(kvs=[pg.kv(b"\xff\xfe", 4, struct.pack("<I", 1))]), r"metadata key 0 is not valid UTF-8"),
    "string past the end": (dict(kvs=[pg.kv("s", 8, struct.pack("<Q", 10 ** 9))]), r"is truncated: the value of 's'"),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_files_are_one_clear_line(what, tmp_path):
    kwargs, pattern = MALFORMED[what]
    path = pg.raw_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(GGUFError, match=pattern) as e:
        GGUFFile(path)
    assert "\n" not in str(e.value)


def test_a_malformed_file_fails_load_and_inspect_the_same_way(tmp_path, capsys):
    path = pg.raw_gguf(tmp_path / "flux1-dev-Q8_0.gguf", version=4)
    for source in (path, tmp_path):  # the file, and the folder holding it
        with pytest.raises(CheckpointError, match="version 4"):
            load_transformer(source)
    assert cli_main(["inspect", str(path)]) == 2
    assert "GGUF file of version 4" in capsys.readouterr().err


@pytest.mark.parametrize("arch_, tensor, extra, pattern", [
    ("llama", "blk.0.attn_q.weight", {"tokenizer.ggml.model": "llama"},
     r"language / text-encoder model \(general.architecture='llama', tensors like 'blk.0.attn_q.weight'\)"),
    ("t5encoder", "enc.blk.0.attn_q.weight", {}, r"language / text-encoder model \(general.architecture='t5encoder'"),
    ("qwen3", "token_embd.weight", {}, r"language / text-encoder model \(general.architecture='qwen3'"),
    ("wan", "blocks.0.self_attn.q.weight", {}, r"is the GGUF of Wan \(general.architecture='wan'\), which mmdit does "
     "not implement"),
    ("sdxl", "input_blocks.0.0.weight", {}, r"is the GGUF of SDXL \(a UNet\)"),
])
def test_other_models_ggufs_are_refused_by_name(arch_, tensor, extra, pattern, tmp_path):
    w = gguf.GGUFWriter(path=None, arch=arch_)
    for k, v in extra.items():
        w.add_string(k, v)
    w.add_tensor(tensor, np.zeros((4, 32), np.float32))
    path = tmp_path / "other.gguf"
    w.write_header_to_file(path=path), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=pattern) as e:
        load_transformer(path)
    assert "\n" not in str(e.value)


# ---- loading: detected like the safetensors, weights kept as stored -------------------------

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfy_gguf_loads_quantized_and_equals_its_values(peer, prefix, tmp_path):
    """Every type in one file: each Linear keeps the file's bytes, everything else holds the
    dequantized values, and the output equals a model given those values."""
    sd = peers.original_state(peer, "")
    path, values, types = pg.comfy_gguf(tmp_path / "m.gguf", sd, arch(peer), pick=pg.cycle(), prefix=prefix)
    assert set(types.values()) == set(pg.ALL)
    model = load_transformer(path)
    safetensors = detect(peers.original_state(peer, prefix))
    det = model.detected
    assert (det.family, det.config, det.prefix) == (safetensors.family, safetensors.config, prefix)
    ckpt = GGUFCheckpoint(path)
    kept = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ggml.GGUFLinear)}
    assert set(kept) == {k for k, q in types.items() if q != "F32" and sd[k].dim() == 2}  # every Linear's
    for k, module in kept.items():  # the file's bytes, as stored
        assert module.qtype == types[k]
        assert torch.equal(module.weight.view(torch.uint8), ckpt.stored(prefix + k)[1].view(torch.uint8)), k
    for k, v in model.state_dict().items():  # the rest: the values the file holds
        if k not in kept:
            assert torch.equal(v, values[k]), k
    err = peers.parity(model, twin(peer, values))
    print(f"\n{arch(peer)} all types{' prefixed' if prefix else ''}: {err:.2e} vs the file's values")
    assert err <= TOL


def test_diffusers_named_gguf_joins_quantized_parts_row_wise(peer, tmp_path):
    """A GGUF in diffusers' key layout goes through the same detection and key table: q / k / v
    (FLUX: + proj_mlp) join into our fused Linears as bytes (rows are whole blocks), the 2-chunk
    adaLN halves swap as rows; parts stored in different types are dequantized at load."""
    sd = peers.diffusers_state(peer)
    path, values, types = pg.comfy_gguf(tmp_path / "d.gguf", sd, arch(peer), pick=lambda n: "Q8_0" if "to_k" not in n
                                        or ".0." not in n else "Q4_0")
    model = load_transformer(path)
    assert model.detected.layout == "diffusers"
    fused = model.single_blocks[1].linear1 if arch(peer) == "flux" else model.joint_blocks[1].x_block.attn.qkv
    assert isinstance(fused, ggml.GGUFLinear) and fused.qtype == "Q8_0"
    first = model.double_blocks[0].img_attn.qkv if arch(peer) == "flux" else model.joint_blocks[0].x_block.attn.qkv
    assert type(first) is torch.nn.Linear  # its to_k is Q4_0, to_q / to_v Q8_0
    err = peers.parity(model, twin(peer, keymaps.from_diffusers(values, peers.family(peer), peers.hidden(peer))))
    assert err <= TOL


def test_files_without_an_image_architecture_tag_load_by_their_keys(tmp_path):
    """stable-diffusion.cpp files have no general.architecture; ComfyUI-GGUF reads those (and its
    'pig' / 'cow' tags) by their keys, and so does mmdit."""
    peer = make_peer("flux")
    for tag in (None, "pig"):
        w = gguf.GGUFWriter(path=None, arch=tag or "flux")
        if tag is None:
            del w.kv_data[0]["general.architecture"]
        for name, t in peers.original_state(peer, "").items():
            w.add_tensor(name, t.numpy())
        path = tmp_path / f"{tag}.gguf"
        w.write_header_to_file(path=path), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        assert GGUFFile(path).architecture == tag
        assert peers.parity(load_transformer(path), peer) <= TOL


def family_state(family: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A small random model of ``family`` in its original layout (our names), from its diffusers
    peer, and the config fields its shapes can't tell (the RoPE split of a small head)."""
    import peers_chroma
    import peers_flux2
    import peers_qwen

    if family in ("sd3", "flux"):
        return peers.original_state(make_peer("flux" if family == "flux" else "sd3.5"), ""), None
    if family == "flux2":
        return peers_flux2.bfl_state(peers_flux2.flux2_peer(), ""), None
    if family == "chroma":
        peer = peers_chroma.chroma_peer()
        return peers_chroma.original_state(peer, ""), {"axes_dim": tuple(peer.config.axes_dims_rope)}
    peer = peers_qwen.qwen_peer() if family == "qwen-image" else peers_qwen.qwen21_peer()
    return peers_qwen.original_state(peer, ""), {"axes_dim": tuple(peer.config.axes_dims_rope)}


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2", "chroma", "qwen-image", "qwen-image-2.1"])
def test_every_family_round_trips_through_mmdit_quantize(family, tmp_path):
    """No family has GGUF code of its own: its original names, detection and key table are the
    safetensors loader's. A bf16 file quantized by ``mmdit quantize`` loads as the same family and
    config, and every tensor holds what gguf-py's reader and dequantizer read from the file."""
    from mmdit.weights.gguf_write import quantize_file

    state, config = family_state(family)
    src = peers.save(state, tmp_path / "src.safetensors", torch.bfloat16)
    out = tmp_path / "m.gguf"
    print("\n" + quantize_file(src, out, "Q5_1", config=config))
    model, reference = load_transformer(out, config=config), load_transformer(src, config=config)
    assert (model.detected.family, model.config) == (family, reference.config)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == ARCH.get(family, family)
    truth = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    kept = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ggml.GGUFLinear)}
    assert any(m.qtype == "Q5_1" for m in kept.values())
    for k, v in model.state_dict().items():
        got = kept[k].dequantized() if k in kept else v
        assert torch.equal(got, truth[k].reshape(got.shape)), k


def test_comfy_orig_shape_metadata_restores_reshaped_tensors(tmp_path):
    """ComfyUI-GGUF stores a tensor whose rows don't fit the K-quant blocks as (n / 256, 256) with
    ``comfy.gguf.orig_shape.<name>`` (ARRAY of INT32, numpy order); the loader reshapes it back."""
    peer = make_peer("sd3.5")
    sd = peers.original_state(peer, "")
    name = "x_embedder.proj.weight"  # (256, 16, 2, 2): a conv, rows of 2
    shape = tuple(sd[name].shape)
    w = gguf.GGUFWriter(path=None, arch="sd3")
    w.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    for k, t in sd.items():
        x = t.numpy()
        if k == name:
            w.add_tensor(k, pg.encode(x.reshape(-1, 256), "Q4_K"), raw_dtype=T.Q4_K)
        else:
            w.add_tensor(k, x)
    path = tmp_path / "reshaped.gguf"
    w.write_header_to_file(path=path), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ckpt = GGUFCheckpoint(path)
    assert ckpt.shape(name) == shape and ckpt.stored(name) is None  # not kept as blocks
    model = load_transformer(path)
    stored = gguf.GGUFReader(path).tensors[[t.name for t in gguf.GGUFReader(path).tensors].index(name)]
    want = torch.from_numpy(gguf.quants.dequantize(stored.data, T.Q4_K).reshape(shape).copy())
    assert torch.equal(model.x_embedder.proj.weight, want)
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(path=None, arch="sd3")
    w.add_array(f"comfy.gguf.orig_shape.{name}", [3, 5])
    w.add_tensor(name, sd[name].numpy().reshape(-1, 4))
    w.write_header_to_file(path=bad), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match=r"orig_shape.x_embedder.proj.weight is \(3, 5\), which does not hold"):
        GGUFCheckpoint(bad)


def test_memory_is_the_files(peer, tmp_path):
    sd = peers.original_state(peer, "")
    for q in ("Q8_0", "Q4_0", "BF16"):
        path, _, _ = pg.comfy_gguf(tmp_path / f"{q}.gguf", sd, arch(peer), pick=lambda n, q=q: q)
        file_bytes = GGUFCheckpoint(path).tensor_bytes()
        for dtype in (torch.float32, torch.bfloat16):
            ratio = fp8.weight_bytes(load_transformer(path, dtype=dtype)) / file_bytes
            print(f"\n{arch(peer)} {q} in {dtype}: resident / file tensor bytes = {ratio:.3f}")
            assert ratio <= MEMORY


# fp32 compute doubles what the file holds in BF16 besides the Linears; SD3(.5)-medium's 226M-entry
# position table (384^2 x 1536; 192^2 x 1536 for SD3) makes that 1.16 (Q8_0) / 1.26 (Q4_0) of the
# file for sd3.5-medium, so fp32 is checked on the models where it is a small part.
@pytest.mark.parametrize("preset, dtype", [("flux.1-dev", torch.bfloat16), ("sd3.5-large", torch.bfloat16),
                                           ("sd3.5-medium", torch.bfloat16), ("flux.1-dev", torch.float32),
                                           ("sd3.5-large", torch.float32)])
@pytest.mark.parametrize("target", ["Q8_0", "Q4_0"])
def test_memory_of_the_official_sizes(preset, dtype, target):
    """The official models on meta: ``mmdit quantize``'s plan for the file, the loader's swap for
    the model; resident weight bytes against the file's tensor bytes."""
    model = mmdit.build_transformer(preset, dtype=dtype, device="meta")
    family = model.config.family
    sd = model.state_dict()
    types = {k: tensor_type(k, tuple(v.shape), "bfloat16", target, ARCH[family]) for k, v in sd.items()}

    class Planned:  # what GGUFCheckpoint.stored gives, on meta
        def stored(self, k):
            t = ggml.TYPES[types[k]]
            return t.name, torch.empty(t.stored_shape(tuple(sd[k].shape)), dtype=ggml.PLAIN.get(t.name, torch.uint8),
                                       device="meta")

    recipes = keymaps.recipes_for(sd, "original", family)
    keep_quantized(model, Planned(), recipes, {}, {k: tuple(v.shape) for k, v in sd.items()}, dtype,
                   model.config.hidden_size)
    file_bytes = sum(ggml.TYPES[types[k]].nbytes(tuple(v.shape)) for k, v in sd.items())
    ratio = fp8.weight_bytes(model) / file_bytes
    print(f"\n{preset} {target} in {dtype}: file {file_bytes / 2 ** 30:.2f} GiB, resident / file = {ratio:.3f}")
    assert ratio <= MEMORY


# ---- what a GGUF model works with ----------------------------------------------------------

@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """A FLUX GGUF holding every type, and the path of a safetensors holding its values (fp32)."""
    peer, tmp = make_peer("flux"), tmp_path_factory.mktemp("every")
    path, values, _ = pg.comfy_gguf(tmp / "f.gguf", peers.original_state(peer, ""), "flux", pick=pg.cycle())
    return peer, path, peers.save(values, tmp / "values.safetensors")


def kohya_lora(model, rank=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {f"lora_unet_{n.replace('.', '_')}.{leaf}": torch.randn(shape, generator=g) * 0.05
            for n, m in model.named_modules() if isinstance(m, ggml.GGUFLinear) and "_blocks." in n
            for leaf, shape in (("lora_down.weight", (rank, m.in_features)),
                                ("lora_up.weight", (m.out_features, rank)))}


def test_lora_runs_unfused_beside_the_quantized_layers(every_type):
    peer, path, full_path = every_type
    model, full = load_transformer(path), load_transformer(full_path)
    lora = kohya_lora(model)
    qkv = model.double_blocks[0].img_attn.qkv
    blocks, qtype = qkv.weight, qkv.qtype
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    with torch.no_grad():
        base = model(x, sigma, ctx, pooled, guidance=g)
    handle = mmdit.apply_lora(model, lora, scale=0.7)
    mmdit.apply_lora(full, lora, scale=0.7)
    wrapped = model.double_blocks[0].img_attn.qkv
    assert isinstance(wrapped, LoRALinear) and wrapped.weight is blocks and wrapped.qtype == qtype
    with torch.no_grad():
        err = rel(model(x, sigma, ctx, pooled, guidance=g), full(x, sigma, ctx, pooled, guidance=g))
        handle.set_scale(0.0)
        off = rel(model(x, sigma, ctx, pooled, guidance=g), base)
    print(f"\nLoRA on a GGUF model vs on the same values in fp32: {err:.2e}")
    assert err <= TOL and off <= TOL
    handle.remove()
    back = model.double_blocks[0].img_attn.qkv
    assert type(back) is ggml.GGUFLinear and back.weight is blocks
    with pytest.raises(ValueError, match=r"can't add to weights kept quantized from a GGUF file "
                                         r"\(double_blocks.0.img_mod.lin \(Q8_0\), .*apply a LoRA unfused"):
        mmdit.apply_lora(model, lora, fuse=True)
    assert type(model.double_blocks[0].img_attn.qkv) is ggml.GGUFLinear  # nothing was changed


def test_dg_fork_and_branches_on_a_gguf_model(every_type):
    from mmdit.branches import Branch, IdentityAttention, SkipLayers

    peer, path, full_path = every_type
    model, full = load_transformer(path), load_transformer(full_path)
    for m in (model, full):
        m.ma = mmdit.MASpec(channels=(3, 17), block=1)
    x, sigma, ctx, pooled, g = peers.inputs(peer)
    kw = dict(guidance=g, fork=slice(1, 3), branches=(Branch(slice(2, 3), SkipLayers((0,))),
                                                       Branch(slice(2, 3), IdentityAttention((1,)))))
    with torch.no_grad():
        out, want = model(x, sigma, ctx, pooled, **kw), full(x, sigma, ctx, pooled, **kw)
    assert out.shape == (3 + 2 + 1 + 1, *x.shape[1:])  # rows, forked rows, one per branch
    assert rel(out, want) <= TOL


def test_dequantize_inside_one_graph_with_the_fork_and_a_lora(tmp_path):
    """The whole forward (every Linear dequantizing its blocks, a LoRA beside them, the DG fork)
    traces as one graph; each type's layer compiles with fullgraph=True and equals eager."""
    peer = peers.flux_peer(num_double=1, num_single=1, heads=2)  # 13 quantized weights; BF16: the kept ones
    types = tuple(q for q in pg.ALL if q not in ("BF16", "F32"))
    path, _, _ = pg.comfy_gguf(tmp_path / "f.gguf", peers.original_state(peer, ""), "flux", pick=pg.cycle(types))
    model = load_transformer(path)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    mmdit.apply_lora(model, kohya_lora(model), scale=0.5)
    x, sigma, ctx, pooled, g = peers.inputs(peer, H=4, W=4, L=3)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, sigma, ctx, pooled, guidance=g, fork=slice(1, 3))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    layers = {m.qtype: m for m in model.modules() if hasattr(m, "qtype")}
    assert set(layers) == set(pg.ALL) - {"F32"}
    inputs = [torch.randn(2, 3, m.in_features) for m in layers.values()]

    def every_layer(*hs):
        return [m(h) for m, h in zip(layers.values(), hs)]
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, eager = torch.compile(every_layer, fullgraph=True, backend="aot_eager")(*inputs), every_layer(*inputs)
    for qtype, a, b in zip(layers, compiled, eager):
        assert rel(a, b) <= TOL, qtype
    torch._dynamo.reset()


# ---- mmdit quantize / inspect ----------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_mmdit_quantize_writes_comfyui_ggufs_layout(target, tmp_path, capsys):
    """The file equals, byte for byte, what ComfyUI-GGUF's convert.py + llama-quantize give for
    the same weights (gguf-py's writer and quantizers): names without prefix in the source's
    order, F32 small / 1-D tensors, BF16 embedders and final layer, the rest in ``target``."""
    name = "flux" if target != "Q4_1" else "sd3.5"
    peer = make_peer(name)
    source = "float16" if target == "F16" else "bfloat16"
    sd = peers.original_state(peer, "model.diffusion_model.")
    src = peers.save({**sd, **peers.extras(peers.family(peer))}, tmp_path / "src.safetensors", getattr(torch, source))
    out = tmp_path / f"m-{target}.gguf"
    assert cli_main(["quantize", str(src), str(out), "--type", target]) == 0
    assert f"wrote {out}: {peers.family(peer)} ({arch(peer)})" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:  # the source's order, transformer keys only, prefix off
        order = [k[len("model.diffusion_model."):] for k in f.keys() if k.startswith("model.diffusion_model.")]
    ours = GGUFFile(out)
    assert list(ours.tensors) == order
    ref, _, _ = pg.comfy_gguf(tmp_path / "ref.gguf", {k: sd["model.diffusion_model." + k] for k in order}, arch(peer),
                              pick=None if target in ("BF16", "F16") else lambda n: target, source=source,
                              file_type={"Q8_0": 7, "Q5_1": 9, "Q5_0": 8, "Q4_1": 3, "Q4_0": 2, "BF16": 32,
                                         "F16": 1}[target])
    assert out.read_bytes() == ref.read_bytes()


def test_inspect_names_the_family_and_the_bytes_per_type(every_type, capsys):
    _, path, _ = every_type
    assert cli_main(["inspect", str(path)]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["family"].strip() == "FLUX.1" and "num_double=1 num_single=2" in lines["config"]
    assert lines["format"].strip().startswith("GGUF v3, general.architecture='flux'")
    per_type = GGUFCheckpoint(path).bytes_per_type()
    assert set(per_type) == set(pg.ALL)
    assert all(f"{q} (" in lines["dtype"] for q in pg.ALL)
    assert lines["bytes"].strip().startswith(f"{next(iter(per_type))} ")


def test_mmdit_quantize_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert "--type {Q8_0,Q5_1,Q5_0,Q4_1,Q4_0,BF16,F16}" in text and "``" not in text
    src = peers.save_original(make_peer("flux"), tmp_path / "src.safetensors", with_extras=False)
    with pytest.raises(ValueError, match="must be a .gguf file"):
        from mmdit.weights.gguf_write import quantize_file
        quantize_file(src, tmp_path / "out.safetensors")
    with pytest.raises(SystemExit) as e:  # not offered: gguf-py has no K-quant quantizer to match
        cli_main(["quantize", str(src), str(tmp_path / "o.gguf"), "--type", "Q4_K"])
    assert e.value.code == 2


# ---- diffusers' GGUF path reads the same files the same way --------------------------------

def diffusers_gguf(peer, path, tmp_path, monkeypatch):
    from diffusers import GGUFQuantizationConfig
    from diffusers.loaders import single_file_model as sfm

    if peers.family(peer) == "flux":  # its converter assumes FLUX.1's width 3072 (see peers._flux_converter)
        monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel",
                            {**sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"],
                             "checkpoint_mapping_fn": peers._flux_converter(peers.hidden(peer))})
    config = peers.save_diffusers_folder(peer, tmp_path / "config")
    return type(peer).from_single_file(str(path), config=str(config), torch_dtype=torch.float32,
                                       quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


@pytest.mark.parametrize("case", ["exact", "fp16-dequant"])
def test_matches_diffusers_gguf_quantization_config(peer, case, tmp_path, monkeypatch):
    """exact: Linear weights in BF16, IQ4_NL, F16, F32 (diffusers computes these in fp32, or
    leaves them plain): <= TOL. fp16-dequant: every Q / K type; diffusers' arithmetic is fp16.
    SD3 files come from an fp32 source (F16 embedders): diffusers can't run a BF16 conv weight."""
    source = "float32" if arch(peer) == "sd3" else "bfloat16"
    types = ["BF16", "IQ4_NL", "F16", "F32"] if case == "exact" else pg.ALL[:10]
    path, _, _ = pg.comfy_gguf(tmp_path / "m.gguf", peers.original_state(peer, ""), arch(peer),
                               pick=pg.cycle(tuple(types)), source=source)
    err = peers.parity(load_transformer(path), diffusers_gguf(peer, path, tmp_path, monkeypatch))
    print(f"\n{arch(peer)} {case}: ours vs diffusers GGUFQuantizationConfig(compute_dtype=fp32): {err:.2e}")
    assert err <= (TOL if case == "exact" else DIFFUSERS_FP16_DEQUANT)


def test_q8_0_from_mmdit_quantize_in_diffusers_and_against_full_precision(peer, tmp_path, monkeypatch):
    source = torch.float32 if arch(peer) == "sd3" else torch.bfloat16
    src = peers.save_original(peer, tmp_path / "src.safetensors", with_extras=False, dtype=source)
    out = tmp_path / "q8.gguf"
    assert cli_main(["quantize", str(src), str(out), "--type", "Q8_0"]) == 0
    model = load_transformer(out)
    err = peers.parity(model, diffusers_gguf(peer, out, tmp_path, monkeypatch))
    distance = peers.parity(model, peers.rounded(peer, source))
    print(f"\n{arch(peer)} Q8_0 (mmdit quantize): vs diffusers {err:.2e}; vs the full-precision model {distance:.2e}")
    assert err <= DIFFUSERS_FP16_DEQUANT
    assert distance <= Q8_0_DISTANCE


# ---- where a GGUF can be --------------------------------------------------------------------

def test_gguf_from_a_folder_and_from_the_hub_cache(every_type, tmp_path, monkeypatch):
    peer, path, _ = every_type
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "flux1-tiny-Q4_K_M.gguf").write_bytes(path.read_bytes())
    model = load_transformer(folder)
    assert model.source_files == [str(folder / "flux1-tiny-Q4_K_M.gguf")] and model.detected.family == "flux"
    (folder / "flux1-tiny-Q8_0.gguf").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"holds several GGUF files .*; pass the one you mean"):
        load_transformer(folder)
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peers.fake_hub_cache(cache, "org/flux-tiny-gguf", {"flux1-tiny-Q8_0.gguf": path},
                         not_downloaded=("flux1-tiny-Q4_0.gguf",))
    model = load_transformer("org/flux-tiny-gguf/flux1-tiny-Q8_0.gguf")
    assert model.detected.family == "flux" and model.source_files[0].endswith("flux1-tiny-Q8_0.gguf")


def test_cost_benchmark_runs(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gguf_cost

    out = gguf_cost.main(["--preset", "flux.1-dev", "--num-layers", "2", "--set", "axes_dim=(4,6,6)", "--set",
                          "num_heads=2", "--set", "head_dim=16", "--set", "context_dim=24", "--set", "pooled_dim=20",
                          "--device", "cpu", "--dtype", "fp32", "--resolution", "64", "--text-len", "5", "--iters",
                          "1", "--warmup", "0", "--types", "Q8_0,BF16", "--dir", str(tmp_path),
                          "--json", str(tmp_path / "cost.json")])
    assert set(out["types"]) == {"Q8_0", "BF16"} and "dequant ms" in capsys.readouterr().out
    for r in out["types"].values():
        assert r["kept_layers"] > 0 and r["max_rel_err_vs_dense"] <= TOL


def test_generate_with_a_gguf_and_text_encoders_from_a_folder(tmp_path, capsys):
    """`mmdit quantize` of a diffusers transformer/ folder, then `generate --model FILE.gguf
    --text-from FOLDER`: the same image as the same values held in full precision."""
    from PIL import Image
    from safetensors.torch import save_file

    folder, _ = peers.sd3_folder(tmp_path / "pipe")
    out = tmp_path / "sd3-Q8_0.gguf"
    assert cli_main(["quantize", str(folder / "transformer"), str(out), "--type", "Q8_0"]) == 0
    model = load_transformer(out)
    assert any(isinstance(m, ggml.GGUFLinear) and m.qtype == "Q8_0" for m in model.modules())
    values = {k: v for k, v in model.state_dict().items()}
    for n, m in model.named_modules():
        if isinstance(m, ggml.GGUFLinear):
            values[f"{n}.weight"] = m.dequantized()
    single = tmp_path / "values.safetensors"
    save_file({k: v.contiguous() for k, v in values.items()}, str(single))
    common = ["--prompt", "a fox", "--steps", "2", "--height", "16", "--width", "16", "--seed", "1"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert cli_main(["generate", "--model", str(out), "--text-from", str(folder), *common, "--output", str(a)]) == 0
    assert cli_main(["generate", "--model", str(single), "--text-from", str(folder), *common, "--output", str(b)]) == 0
    assert f"text encoders, VAE and scheduler from {folder}" in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.slow
def test_inductor_dequantizes_every_type_to_the_same_bits():
    """Every type's dequantization in one inductor graph (one lowering, a kernel or more per type)."""
    qtypes = [q for q in pg.ALL if q not in ggml.PLAIN]
    blocks = [torch.from_numpy(pg.random_blocks(q, 24, seed=5)).reshape(3, -1) for q in qtypes]

    def every_type(*blocks):
        return [ggml.dequantize(b, q) for b, q in zip(blocks, qtypes)]

    torch._dynamo.reset()
    for qtype, got, want in zip(qtypes, torch.compile(every_type, fullgraph=True)(*blocks), every_type(*blocks)):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), qtype
    torch._dynamo.reset()
