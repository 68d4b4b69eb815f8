"""FLUX.1 Fill / Depth / Canny / Kontext transformers: every layout loads, outputs equal diffusers'.

Fill and Depth / Canny take more input features than they output (384 / 128 -> 64); Kontext
has FLUX.1-dev's shapes and appends a reference image's tokens (ids (1, row, col)). Each case
writes a random ``FluxTransformer2DModel`` in one layout, loads it with ``load_transformer``
and compares fp32 velocities at max|ours - peer| / max|peer| <= 1e-4.
"""
import pytest
import torch

import mmdit
from mmdit.weights.transformer import load_transformer

from helpers import compile_whole
import peers

TOL = 1e-4
VARIANTS = {"fill": 384, "control": 128, "kontext": 64}  # in_channels; all output 64


def variant_peer(in_channels: int, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    peer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=64, num_layers=1,
                                  num_single_layers=2, attention_head_dim=128, num_attention_heads=2,
                                  joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True)
    return peers.randomize(peer, seed)


def grid_ids(h, w, index=0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


@torch.no_grad()
def run_variant_peer(peer, x, sigma, ctx, pooled, guid, refs=0):
    """diffusers' velocity for our x (B, C, H, W): C = in_channels/4, plus 16 per reference."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    c_in = peer.config.in_channels // 4
    parts = [x[:, :c_in]] + [x[:, c_in + 16 * j:c_in + 16 * (j + 1)] for j in range(refs)]
    tokens = torch.cat([peers.pack(p) for p in parts], dim=1)
    ids = torch.cat([grid_ids(h, w, j) for j in range(refs + 1)])
    out = peer(hidden_states=tokens, timestep=sigma, guidance=guid, encoder_hidden_states=ctx,
               pooled_projections=pooled, img_ids=ids, txt_ids=torch.zeros(ctx.shape[1], 3), return_dict=False)[0]
    out = out[:, :h * w]  # the reference tokens are not part of the output
    return out.view(B, h, w, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, 16, H, W)


def variant_inputs(peer, refs=0, B=3, H=8, W=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, peer.config.in_channels // 4 + 16 * refs, H, W, generator=g)
    sigma = torch.rand(B, generator=g) * 0.9 + 0.05
    ctx = torch.randn(B, 5, 40, generator=g)
    pooled = torch.randn(B, 24, generator=g)
    guid = 1.0 + 4.0 * torch.rand(B, generator=g)
    return x, sigma, ctx, pooled, guid


def write(peer, tmp, layout):
    if layout == "bfl":
        return peers.save_original(peer, tmp / "flux1-variant.safetensors", prefix="", with_extras=False)
    if layout == "prefixed":
        return peers.save_original(peer, tmp / "comfy.safetensors")
    if layout == "diffusers-file":
        return peers.save_diffusers_file(peer, tmp / "variant.safetensors")
    return peers.save_diffusers_folder(peer, tmp / "folder", pipeline=True)


@pytest.mark.parametrize("layout", ["bfl", "prefixed", "diffusers-file", "diffusers-folder"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_loads_and_matches_diffusers(tmp_path, variant, layout):
    peer = variant_peer(VARIANTS[variant])
    model = load_transformer(write(peer, tmp_path, layout))
    assert (model.config.in_channels, model.config.out_channels) == (VARIANTS[variant], 64)
    refs = 1 if variant == "kontext" else 0
    x, sigma, ctx, pooled, guid = variant_inputs(peer, refs)
    want = run_variant_peer(peer, x, sigma, ctx, pooled, guid, refs)
    with torch.no_grad():
        got = model(x, sigma, ctx, pooled, guidance=guid)
    assert got.shape == want.shape == (3, 16, 8, 6)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= TOL, f"{variant} / {layout}: rel. error {err:.2e}"


def test_bfl_fill_file_agrees_with_diffusers_converter(tmp_path):
    """Our BFL layout for a Fill model is what diffusers' own single-file converter reads."""
    peer = variant_peer(384)
    original = peers.original_state(peer, prefix="")
    converted = peers.diffusers_convert(original, "flux", width=256)
    theirs = peers.diffusers_state(peer)
    assert set(converted) == set(theirs)
    assert all(torch.equal(converted[k], theirs[k]) for k in theirs)


def test_forked_rows_carry_the_conditioning_channels_and_reference_tokens():
    """A forked row equals a separate disrupted forward of the same row, conditioning included."""
    for in_channels, refs in [(384, 0), (64, 1)]:
        peer = variant_peer(in_channels)
        model = mmdit.build_transformer(mmdit.FluxConfig(num_double=1, num_single=2, num_heads=2, context_dim=40,
                                                         pooled_dim=24, in_channels=in_channels, out_channels=64))
        model.load_state_dict(mmdit.weights.keymaps.from_diffusers(peers.diffusers_state(peer), "flux", 256))
        model.ma = mmdit.MASpec(channels=(3, 77), block=1)
        x, sigma, ctx, pooled, guid = variant_inputs(peer, refs, B=2)
        with torch.no_grad():
            out = model(x, sigma, ctx, pooled, guidance=guid, fork=slice(1, 2))
            alone = model(x[1:], sigma[1:], ctx[1:], pooled[1:], guidance=guid[1:], disrupt=slice(0, 1))
            plain = model(x, sigma, ctx, pooled, guidance=guid)
        assert out.shape == (3, 16, 8, 6)
        assert torch.allclose(out[:2], plain, atol=1e-5)
        assert torch.allclose(out[2:], alone, atol=1e-5)
        assert (out[2] - out[1]).abs().max() > 1e-3  # the disruption did something


def test_wrong_input_channels_is_one_clear_error():
    model = mmdit.build_transformer("flux.1-dev", num_layers=2, num_heads=1, context_dim=8, pooled_dim=8,
                                    in_channels=128, out_channels=64)
    with pytest.raises(ValueError, match="expected 32 input channels, got 16"):
        model(torch.randn(1, 16, 4, 4), 0.5, torch.randn(1, 3, 8), torch.randn(1, 8), guidance=3.5)


@pytest.mark.slow
@pytest.mark.parametrize("in_channels, refs", [(384, 0), (64, 1)])
def test_fill_and_kontext_forward_with_the_fork_is_one_graph(in_channels, refs):
    """The conditioning channels and the reference tokens add no graph break or host sync."""
    model = mmdit.build_transformer(mmdit.FluxConfig(num_double=1, num_single=1, num_heads=1, context_dim=40,
                                                     pooled_dim=24, in_channels=in_channels, out_channels=64))
    model.ma = mmdit.MASpec(channels=(3, 77), block=1)
    x, sigma, ctx, pooled, guid = variant_inputs(variant_peer(in_channels), refs, B=2)
    kw = dict(guidance=guid, fork=slice(1, 2))
    with torch.no_grad():
        want = model(x, sigma, ctx, pooled, **kw)
        assert (compile_whole(model, x, sigma, ctx, pooled, **kw) - want).abs().max() <= 1e-5 * want.abs().max()
