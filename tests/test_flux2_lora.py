"""FLUX.2 LoRA files in every layout people have apply exactly.

Layouts (names from diffusers' ``Flux2LoraLoaderMixin.lora_state_dict`` and its converters):
  diffusers / PEFT   ``transformer.<diffusers module>.lora_A/B.weight``, alpha in the metadata
  ComfyUI / ai-toolkit ``diffusion_model.<BFL module>.lora_A/B.weight`` (ComfyUI: + ``.alpha``;
                     older ai-toolkit: ``lora_down/lora_up``; raw PEFT: ``base_model.model.``)
  kohya / musubi     ``lora_unet_<BFL module, dots as _>.lora_down/up.weight`` + ``.alpha``
                     (musubi's fused qkv may hold q, k, v block-diagonally at rank 3r)

Each layer's delta must be ``alpha / rank * up @ down`` (per layer, 1e-5 relative), and the output
must equal diffusers' (its ``lora_state_dict`` converters + ``load_lora_adapter``) where diffusers
reads the format.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

import mmdit
from mmdit.weights import keymaps
from mmdit.weights.transformer import load_transformer

import peers
import peers_flux2 as P

PER_LAYER = 1e-5  # max|our delta - alpha/rank * up @ down| / max|that|, per layer
TOL = 1e-5  # output vs diffusers with the same LoRA, relative to the output scale
EFFECT = 1e-2  # the LoRA changes the output at least this much, or the parity proves nothing
SCALE = 0.7
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    peer = P.flux2_peer(num_double=1, num_single=2, heads=2, guidance=True)
    path = P.save(P.bfl_state(peer), tmp_path_factory.mktemp("lora") / "flux2.safetensors")
    return peer, path


def pair(g, n_in, n_out, rank=RANK):
    return torch.randn(rank, n_in, generator=g) * 0.05, torch.randn(n_out, rank, generator=g) * 0.05


def ours_lora(model, style: str, skip=(), alpha=ALPHA, seed=5):
    """Every Linear of ours (but ``skip``), in BFL names: (file state dict, {our name: expected delta})."""
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or n.startswith(skip):
            continue
        down, up = pair(g, m.in_features, m.out_features)
        key, (a, b) = {"comfy": ("diffusion_model." + n, ("lora_A", "lora_B")),
                       "ai-toolkit": ("diffusion_model." + n, ("lora_A", "lora_B")),
                       "ai-toolkit-down-up": ("diffusion_model." + n, ("lora_down", "lora_up")),
                       "peft": ("base_model.model." + n, ("lora_A", "lora_B")),
                       "kohya": ("lora_unet_" + n.replace(".", "_"), ("lora_down", "lora_up"))}[style]
        sd[f"{key}.{a}.weight"], sd[f"{key}.{b}.weight"] = down, up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        want[n] = (alpha or RANK) / RANK * up @ down
    return sd, want


def diffusers_lora(peer, seed=3):
    """Every diffusers Linear of the peer: (state dict, metadata, {our name: expected delta}) (q, k, v
    deltas joined into our qkv rows, norm_out's halves swapped back: the key map, tested apart)."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for n, m in peer.named_modules():
        if isinstance(m, torch.nn.Linear):
            down, up = pair(g, m.in_features, m.out_features)
            sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = down, up
            deltas[f"{n}.weight"] = ALPHA / RANK * up @ down
    meta = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA,
            "transformer.target_modules": sorted(k[len("transformer."):-len(".lora_A.weight")]
                                                 for k in sd if k.endswith("lora_A.weight"))}
    want = keymaps.from_diffusers(deltas, "flux2", P.hidden(peer))
    return sd, meta, {k[:-len(".weight")]: v for k, v in want.items()}


def musubi_qkv(model, seed=9):
    """kohya qkv LoRAs at rank 3r with q, k, v block-diagonal in up (a diffusers LoRA saved by musubi)."""
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    for n, m in model.named_modules():
        if n.endswith("attn.qkv"):
            parts = [pair(g, m.in_features, m.out_features // 3) for _ in range(3)]
            down = torch.cat([d for d, _ in parts])
            up = torch.block_diag(*[u for _, u in parts])
            key = "lora_unet_" + n.replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
            sd[key + ".alpha"] = torch.tensor(3 * ALPHA)
            want[n] = ALPHA / RANK * up @ down
    return sd, want


def check_deltas(handle, want: dict):
    assert set(handle.adapters) == set(want)
    for name, adapter in handle.adapters.items():
        got = adapter.delta() / handle.scale
        err = ((got - want[name]).abs().max() / want[name].abs().max()).item()
        assert err <= PER_LAYER, (name, err)


def run(model, peer):
    x, sigma, ctx, g, refs = P.inputs(peer, refs=((1, 3, 2),))
    with torch.no_grad():
        return model(x, sigma, ctx, guidance=g, refs=refs)


def diffusers_twin(peer, sd, metadata=None):
    """A copy of the peer with ``sd`` loaded by diffusers' FLUX.2 LoRA reader at SCALE."""
    from diffusers import Flux2Pipeline

    twin = peers.rounded(peer, torch.float32)
    converted = Flux2Pipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    twin.load_lora_adapter(converted, prefix="transformer", adapter_name="x", metadata=metadata)
    twin.set_adapters(["x"], weights=[SCALE])
    return twin


def parity_with_diffusers(model, peer, twin) -> float:
    err = P.parity(model, twin, refs=((1, 3, 2),))
    print(f"\nLoRA output vs diffusers: {err:.2e}")
    return err


def test_diffusers_peft_lora(base, tmp_path):
    peer, path = base
    model = load_transformer(path)
    plain = run(model, peer)
    sd, meta, want = diffusers_lora(peer)
    file = tmp_path / "peft.safetensors"
    save_file(sd, str(file), metadata={"lora_adapter_metadata": json.dumps(meta)})
    handle = mmdit.apply_lora(model, file, scale=SCALE)
    check_deltas(handle, want)  # includes norm_out.linear -> final_layer.adaLN_modulation.1, halves swapped
    assert parity_with_diffusers(model, peer, diffusers_twin(peer, sd, meta)) <= TOL
    assert P.rel(run(model, peer), plain) >= EFFECT
    handle.remove()
    assert torch.equal(run(model, peer), plain)


@pytest.mark.parametrize("style", ["comfy", "ai-toolkit", "ai-toolkit-down-up", "peft", "kohya"])
def test_bfl_named_loras_equal_the_formula(style, base):
    """Every Linear of the model, final layer and shared modulations included."""
    _, path = base
    model = load_transformer(path)
    sd, want = ours_lora(model, style, alpha=None if style in ("ai-toolkit", "peft") else ALPHA)
    check_deltas(mmdit.apply_lora(model, sd, scale=SCALE), want)


# diffusers' readers: ai-toolkit refuses .alpha and maps final_layer.adaLN_modulation.1 to norm_out.linear
# without swapping its halves; kohya knows the blocks, img_in, txt_in, time_in and final_layer.linear only
DIFFUSERS_READS = {
    "ai-toolkit": dict(alpha=None, skip=("final_layer.adaLN_modulation",)),
    "peft": dict(alpha=None, skip=("final_layer.adaLN_modulation",)),
    "kohya": dict(alpha=ALPHA, skip=("final_layer.adaLN_modulation", "guidance_in", "double_stream_modulation",
                                     "single_stream_modulation")),
}


@pytest.mark.parametrize("style", list(DIFFUSERS_READS))
def test_bfl_named_loras_match_diffusers(style, base):
    peer, path = base
    model = load_transformer(path)
    plain = run(model, peer)
    sd, want = ours_lora(model, style, **DIFFUSERS_READS[style])
    handle = mmdit.apply_lora(model, sd, scale=SCALE)
    check_deltas(handle, want)
    assert parity_with_diffusers(model, peer, diffusers_twin(peer, sd)) <= TOL
    assert P.rel(run(model, peer), plain) >= EFFECT


def test_musubi_block_diagonal_qkv(base):
    """diffusers splits such a qkv LoRA sparsely (its own branch); both equal the plain formula."""
    peer, path = base
    model = load_transformer(path)
    sd, want = musubi_qkv(model)
    handle = mmdit.apply_lora(model, sd, scale=SCALE)
    check_deltas(handle, want)
    assert parity_with_diffusers(model, peer, diffusers_twin(peer, sd)) <= TOL


def test_fused_equals_unfused_and_remove_is_bit_exact(base):
    _, path = base
    model = load_transformer(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peer = P.flux2_peer(num_double=1, num_single=2, heads=2, guidance=True)
    sd, _ = ours_lora(model, "kohya")
    unfused = mmdit.apply_lora(model, sd, scale=SCALE)
    want = run(model, peer)
    unfused.remove()
    fused = mmdit.apply_lora(model, sd, scale=SCALE, fuse=True)
    assert P.rel(run(model, peer), want) <= PER_LAYER
    fused.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
