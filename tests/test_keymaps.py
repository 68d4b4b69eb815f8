"""Key tables: both directions are exact inverses, and agree with diffusers' own converters."""
import pytest
import torch
from safetensors.torch import load_file

import mmdit
from mmdit.weights import keymaps

import peers

PRESETS = list(peers.FULL)
# tensors per file, original / diffusers (docs/architecture.md, key maps)
TENSOR_COUNTS = {"sd3-medium": (491, 683), "sd3.5-medium": (665, 909), "sd3.5-large": (923, 1227),
                 "flux.1-dev": (780, 1160), "flux.1-schnell": (776, 1156)}


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", PRESETS)
def test_full_size_maps_match_our_model_and_diffusers_converter(name):
    """At the real sizes (on meta): diffusers -> ours gives exactly our model's keys and shapes,
    ours -> diffusers gives diffusers' back, and diffusers' single-file converter reads our
    original-layout names into the same diffusers state dict."""
    dsd, _ = peers.full_size(name)
    cfg = mmdit.preset(name)
    ours = keymaps.from_diffusers(dsd, cfg.family, cfg.hidden_size)
    model = mmdit.build_transformer(name, device="meta")
    assert shapes(ours) == shapes(model.state_dict())
    assert shapes(keymaps.to_diffusers(ours, cfg.family, cfg.hidden_size)) == shapes(dsd)
    converted = peers.diffusers_convert(keymaps.to_original(ours), cfg.family)
    assert shapes(converted) == shapes(dsd)
    assert (len(ours), len(dsd)) == TENSOR_COUNTS[name]


SMALL = {  # real structure (dual layers, qk-norm, guidance, pre-only last block), tiny widths
    "sd3-medium": dict(num_layers=2, num_heads=2, head_dim=8, pos_embed_max_size=4, context_dim=12, pooled_dim=10),
    "sd3.5-medium": dict(num_layers=3, num_heads=2, head_dim=8, pos_embed_max_size=4, context_dim=12,
                         pooled_dim=10, dual_attention_layers=(0, 1)),
    "sd3.5-large": dict(num_layers=2, num_heads=3, head_dim=8, pos_embed_max_size=4, context_dim=12, pooled_dim=10),
    "flux.1-dev": dict(num_double=2, num_single=2, num_heads=2, head_dim=8, axes_dim=(2, 2, 4), context_dim=12,
                       pooled_dim=10),
    "flux.1-schnell": dict(num_double=1, num_single=3, num_heads=3, head_dim=8, axes_dim=(2, 2, 4),
                           context_dim=12, pooled_dim=10),
}


def random_ours(name):
    torch.manual_seed(0)
    model = mmdit.build_transformer(name, **SMALL[name])
    return {k: torch.randn(v.shape) for k, v in model.state_dict().items()}, model.config


@pytest.mark.parametrize("name", PRESETS)
def test_ours_to_diffusers_to_ours_is_identity(name):
    ours, cfg = random_ours(name)
    there = keymaps.to_diffusers(ours, cfg.family, cfg.hidden_size)
    back = keymaps.from_diffusers(there, cfg.family, cfg.hidden_size)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # and the original layout is ours with a prefix
    orig = keymaps.to_original(ours, "model.diffusion_model.")
    assert {k[len("model.diffusion_model."):]: v for k, v in orig.items()} == ours


@pytest.mark.parametrize("make", [
    lambda: peers.sd3_peer(num_layers=3, qk_norm=True, dual=(0, 2)),
    lambda: peers.flux_peer(num_double=2, num_single=1, guidance=False),
], ids=["sd3", "flux"])
def test_diffusers_to_ours_to_diffusers_is_identity(make):
    peer = make()
    dsd = peers.diffusers_state(peer)
    ours = keymaps.from_diffusers(dsd, peers.family(peer), peers.hidden(peer))
    back = keymaps.to_diffusers(ours, peers.family(peer), peers.hidden(peer))
    assert back.keys() == dsd.keys()
    assert all(torch.equal(back[k], dsd[k]) for k in dsd)


@pytest.mark.parametrize("make", [
    lambda: peers.sd3_peer(num_layers=3, qk_norm=True, dual=(0, 1)),
    lambda: peers.sd3_peer(num_layers=2),
    lambda: peers.flux_peer(num_double=2, num_single=2, guidance=True),
    lambda: peers.flux_peer(num_double=1, num_single=2, guidance=False, heads=1),
], ids=["sd3.5-medium-like", "sd3-medium-like", "flux-dev-like", "flux-schnell-like"])
def test_original_file_written_by_our_map_reads_back_through_diffusers_converter(make, tmp_path):
    """The proof of the original layout: the file we write (prefix, other components beside it)
    is turned by diffusers' own single-file converter into exactly the peer's state dict."""
    peer = make()
    path = peers.save_original(peer, tmp_path / "model.safetensors")
    sd = load_file(str(path))
    sd = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    converted = peers.diffusers_convert(sd, peers.family(peer), peers.hidden(peer))
    want = peers.diffusers_state(peer)
    assert converted.keys() == want.keys()
    assert all(torch.equal(converted[k], want[k]) for k in want)


def test_only_two_chunk_adaln_swaps_halves():
    H = 4
    two, six = torch.arange(2 * H * H).view(2 * H, H).float(), torch.arange(6 * H * H).view(6 * H, H).float()
    sd = {"final_layer.adaLN_modulation.1.weight": two, "joint_blocks.0.context_block.adaLN_modulation.1.weight": six,
          "joint_blocks.1.context_block.adaLN_modulation.1.weight": two}
    out = keymaps.to_diffusers(sd, "sd3", H)
    assert torch.equal(out["norm_out.linear.weight"], torch.cat([two[H:], two[:H]]))
    assert torch.equal(out["transformer_blocks.1.norm1_context.linear.weight"], torch.cat([two[H:], two[:H]]))
    assert torch.equal(out["transformer_blocks.0.norm1_context.linear.weight"], six)


def test_flux_linear1_splits_into_qkv_and_mlp():
    H = 4
    w = torch.arange(7 * H * H).view(7 * H, H).float()
    out = keymaps.to_diffusers({"single_blocks.3.linear1.weight": w}, "flux", H)
    assert [out[f"single_transformer_blocks.3.{n}.weight"].shape[0]
            for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")] == [H, H, H, 4 * H]
    assert torch.equal(out["single_transformer_blocks.3.proj_mlp.weight"], w[3 * H:])


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="joint_blocks.0.x_block.attn.bogus.weight"):
        keymaps.to_diffusers({"joint_blocks.0.x_block.attn.bogus.weight": torch.zeros(1)}, "sd3", 4)
    recipes, unmatched, incomplete = keymaps.plan_from_diffusers(
        ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_v.weight", "what.ever"], "sd3")
    assert recipes == {} and unmatched == ["what.ever"]
    assert incomplete == ["transformer_blocks.0.attn.to_k.weight"]
