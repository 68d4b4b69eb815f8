"""GGUF: a strict reader, exact dequantization, weights kept quantized, and ``mmdit quantize``.

Files are written with gguf-py (the reference; ``tests/peers_gguf.py``) in ComfyUI-GGUF's layout:
original names, with or without ``model.diffusion_model.``, small and 1-D tensors F32, the
embedders and final layer BF16 / F16, 2-D weights quantized (K and IQ types: random valid
blocks, which gguf-py cannot quantize to). The truth for every value is
``gguf.quants.dequantize``. diffusers' ``GGUFQuantizationConfig`` path is the end-to-end peer.
"""
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import mmdit
from mmdit import fp8, ggml
from mmdit.cli import QUANT_TYPES, main as cli_main
from mmdit.lora import LoRALinear
from mmdit.weights import keymaps
from mmdit.weights.checkpoint import CheckpointError
from mmdit.weights.detect import detect
from mmdit.weights.gguf import GGUFCheckpoint, GGUFError, GGUFFile, keep_quantized
from mmdit.weights.gguf_write import ARCH, TARGETS, tensor_type, write_gguf
from mmdit.weights.transformer import load_transformer

import peers
import peers_gguf as pg

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
               "w.f16": ("F16", (2, 3, 5)), "w.f32": ("F32", (9,)), "w.iq4": ("IQ4_XS", (1, 256))}
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
        assert np.array_equal(ours.stored(t.name).view(torch.uint8).numpy().reshape(-1), t.data.view(np.uint8).reshape(-1))
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
    write_gguf(tmp_path / "ours.gguf", "sd3", 7, [(n, q, s, lambda n=n: torch.from_numpy(data[n])) for n, q, s in tensors])
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
    "misaligned offset": (dict(infos=[("a", [4], 0, 0), ("b", [32, 2], Q8, 16)]), r"'b' has data offset 16, expected 32"),
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


def test_memory_is_the_files(peer, tmp_path):
    sd = peers.original_state(peer, "")
    for q in ("Q8_0", "Q4_0", "BF16"):
        path, _, _ = pg.comfy_gguf(tmp_path / f"{q}.gguf", sd, arch(peer), pick=lambda n, q=q: q)
        file_bytes = GGUFCheckpoint(path).tensor_bytes()
        for dtype in (torch.float32, torch.bfloat16):
            ratio = fp8.weight_bytes(load_transformer(path, dtype=dtype)) / file_bytes
            print(f"\n{arch(peer)} {q} in {dtype}: resident / file tensor bytes = {ratio:.3f}")
            assert ratio <= MEMORY


@pytest.mark.parametrize("preset", ["flux.1-dev", "sd3.5-large", "sd3.5-medium"])
@pytest.mark.parametrize("target", ["Q8_0", "Q4_0"])
def test_memory_of_the_official_sizes(preset, target):
    """The official models on meta: ``mmdit quantize``'s plan for the file, the loader's swap for
    the model (bf16 compute); resident weight bytes against the file's tensor bytes."""
    model = mmdit.build_transformer(preset, dtype=torch.bfloat16, device="meta")
    family = model.config.family
    sd = model.state_dict()
    types = {k: tensor_type(k, tuple(v.shape), "bfloat16", target, ARCH[family]) for k, v in sd.items()}

    class Planned:  # what GGUFCheckpoint.stored gives, on meta
        def stored(self, k):
            t = ggml.TYPES[types[k]]
            return t.name, torch.empty(t.stored_shape(tuple(sd[k].shape)), dtype=ggml.PLAIN.get(t.name, torch.uint8),
                                       device="meta")

    recipes = keymaps.recipes_for(sd, "original", family)
    keep_quantized(model, Planned(), recipes, {}, {k: tuple(v.shape) for k, v in sd.items()}, torch.bfloat16,
                   model.config.hidden_size)
    file_bytes = sum(ggml.TYPES[types[k]].nbytes(tuple(v.shape)) for k, v in sd.items())
    ratio = fp8.weight_bytes(model) / file_bytes
    print(f"\n{preset} {target}: file {file_bytes / 2 ** 30:.2f} GiB, resident / file = {ratio:.3f}")
    assert ratio <= MEMORY
