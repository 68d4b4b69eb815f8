"""Qwen-Image 1.0 and 2.1 transformers: parity with diffusers' in every checkpoint layout, the text
padding mask, condition images, DG's fork and the SLG / PAG branches, one graph, the Triton kernels.
(Key maps, detection, fp8 and LoRA: test_qwen_checkpoints.py.)

Peers are ``QwenImageTransformer2DModel`` / ``QwenImage21Transformer2DModel`` with random weights
(tests/peers_qwen.py), run in our call convention. Batches hold prompts of different lengths
(right padding, as the pipelines pad) and, for 2.1, two condition images inside the text.
"""
import copy

import pytest
import torch

import mmdit
from mmdit.branches import Branch, IdentityAttention, SkipLayers
from mmdit.models.rows import BlockRows
from mmdit.weights.transformer import load_transformer

import peers
import peers_qwen as pq
from peers_qwen import inputs, load_peer, rel, run_peer, write

TOL = 1e-5  # fp32 parity with diffusers, max|ours - peer| / max|peer| (measured ~2e-7)
SAME = 1e-5  # the same computation by two paths of ours (fork vs separate forward)
EFFECT = 1e-3  # a mask / perturbation must change the output at least this much

TINY = {"qwen-image": dict(num_layers=3, num_heads=2, head_dim=16, context_dim=24, in_channels=16,
                           axes_dim=(8, 4, 4)),
        "qwen-image-2.1": dict(num_layers=3, num_heads=2, head_dim=16, context_dim=32, in_channels=8,
                               axes_dim=(4, 6, 6))}


def tiny(name, seed=0, **extra):
    torch.manual_seed(seed)
    model = mmdit.build_transformer(name, **{**TINY[name], **extra}).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero / one inits would hide wiring mistakes
            p.normal_(0, 0.1)
    return model


# ---- every layout against diffusers ---------------------------------------------------------

LAYOUTS = {  # id: (family, how)
    "1.0-official": ("qwen-image", "official"), "1.0-comfy-prefixed": ("qwen-image", "comfy"),
    "1.0-comfy-bf16": ("qwen-image", "comfy-bf16"), "1.0-comfy-fp8": ("qwen-image", "comfy-fp8"),
    "1.0-comfy-scaled-fp8-old": ("qwen-image", "comfy-scaled-old"),
    "1.0-comfy-scaled-fp8-new": ("qwen-image", "comfy-scaled-new"),
    "1.0-diffusers-sharded": ("qwen-image", "diffusers-sharded"),
    "2.1-original-fused": ("qwen-image-2.1", "official"), "2.1-comfy-prefixed": ("qwen-image-2.1", "comfy"),
    "2.1-comfy-split": ("qwen-image-2.1", "comfy-split"),
    "2.1-comfy-scaled-fp8-new": ("qwen-image-2.1", "comfy-scaled-new"),
    "2.1-diffusers-sharded": ("qwen-image-2.1", "diffusers-sharded"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_every_layout_loads_and_matches_diffusers(case, tmp_path):
    fam, how = LAYOUTS[case]
    peer = load_peer(fam)
    source, held = write(peer, tmp_path, how)
    model = load_transformer(source)
    assert model.config.family == fam and all(p.dtype == torch.float32 for p in model.state_dict().values())
    reference = pq.with_weights(peer, held)
    args, kw = inputs(peer)
    with torch.no_grad():
        got = model(*args, **kw)
    err = rel(got, run_peer(reference, args, kw))
    print(f"\n{case}: {model.detected.layout}, prefix {model.detected.prefix!r}, config from "
          f"{model.detected.config_source}: max rel err {err:.2e}")
    assert got.shape == args[0].shape and err <= TOL


def test_hub_ids_load_through_the_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fam, repo in (("qwen-image", "Qwen/Qwen-Image"), ("qwen-image-2.1", "Qwen/Qwen-Image-2.1")):
        peer = load_peer(fam, seed=3)
        folder, _ = write(peer, tmp_path / fam, "diffusers-sharded")
        files = {str(p.relative_to(folder)): p for p in (folder / "transformer").iterdir()}
        peers.fake_hub_cache(cache, repo, {**files, "model_index.json": folder / "model_index.json"},
                             not_downloaded=("vae/diffusion_pytorch_model.safetensors",))
        model = load_transformer(repo)
        args, kw = inputs(peer)
        with torch.no_grad():
            assert rel(model(*args, **kw), run_peer(peer, args, kw)) <= TOL
        assert model.detected.config_source == "config.json"


def test_padding_mask_batches_prompts_like_alone_and_does_something():
    """1.0: a padded row equals its prompt alone without padding (text positions don't move)."""
    model = tiny("qwen-image")
    (x, sigma, ctx), kw = inputs(model, lengths=(7, 4, 5))
    with torch.no_grad():
        batched = model(x, sigma, ctx, **kw)
        alone = model(x[1:2], sigma[1:2], ctx[1:2, :4])
        unmasked = model(x, sigma, ctx)
    assert rel(batched[1:2], alone) <= SAME
    assert rel(unmasked[1:], batched[1:]) >= EFFECT  # the padded keys would change it


def test_21_mask_images_and_causal_condition_matter():
    model = tiny("qwen-image-2.1")
    (x, sigma, ctx), kw = inputs(model)
    with torch.no_grad():
        out = model(x, sigma, ctx, **kw)
        assert rel(model(x, sigma, ctx, images=kw["images"], image_slots=kw["image_slots"])[1:], out[1:]) >= EFFECT
        other = tuple(i.flip(0) for i in kw["images"])
        assert rel(model(x, sigma, ctx, **{**kw, "images": other}), out) >= EFFECT
    peer = pq.qwen21_peer(causal_condition=False)
    ours = mmdit.build_transformer("qwen-image-2.1", num_layers=2, num_heads=2, head_dim=16, context_dim=32,
                                   in_channels=8, axes_dim=(4, 6, 6), causal_condition=False)
    ours.load_state_dict(pq.ours_state(peer))
    args, kw = inputs(peer)
    with torch.no_grad():
        assert rel(ours(*args, **kw), run_peer(peer, args, kw)) <= TOL


def test_bad_inputs_are_clear_errors():
    model = tiny("qwen-image")
    (x, sigma, ctx), kw = inputs(model)
    with pytest.raises(ValueError, match="must be even"):
        model(x[:, :, :11], sigma, ctx)
    with pytest.raises(ValueError, match=r"context \(B, L, 24\)"):
        model(x, sigma, torch.randn(3, 7, 40))
    with pytest.raises(ValueError, match=r"context_mask must be \(3, 7\)"):
        model(x, sigma, ctx, context_mask=torch.ones(3, 5))
    model = tiny("qwen-image-2.1")
    (x, sigma, ctx), kw = inputs(model)
    with pytest.raises(ValueError, match="2 condition images but 1 image_slots"):
        model(x, sigma, ctx, images=kw["images"], image_slots=(1,))
    with pytest.raises(ValueError, match="must follow the previous image's"):
        model(x, sigma, ctx, images=kw["images"], image_slots=(1, 2))
    with pytest.raises(ValueError, match="h\\*w a multiple of 4"):
        model(x, sigma, ctx, images=(torch.randn(3, 8, 3, 3),), image_slots=(0,))


# ---- the DG fork and the perturbed branches ---------------------------------------------

@pytest.mark.parametrize("name,block,streams", [("qwen-image", 1, ("image",)), ("qwen-image", 2, ("image", "text")),
                                                ("qwen-image-2.1", 1, ("image",)),
                                                ("qwen-image-2.1", 0, ("image", "text")),
                                                ("qwen-image-2.1", 1, ("text",))])  # the prefix after the last block feeds nothing
def test_fork_equals_a_separate_disrupted_forward(name, block, streams):
    model = tiny(name)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=block, rho=lambda s: 0.5 * s, streams=streams)
    args, kw = inputs(model)
    with torch.no_grad():
        plain = model(*args, **kw)
        forked = model(*args, **kw, fork=slice(1, 3))
        disrupted = model(*args, **kw, disrupt=slice(0, 3))
    assert forked.shape[0] == 5
    assert rel(forked[:3], plain) <= SAME and rel(forked[3:], disrupted[1:3]) <= SAME
    assert rel(disrupted, plain) >= EFFECT


def skipped(model, layers):
    """A copy whose listed blocks return their inputs."""
    model = copy.deepcopy(model)
    for i in layers:
        model.transformer_blocks[i].forward = lambda a, b, *rest, rows=None: (a, b)
    return model


def identity_everywhere(model, layers, rows):
    """A copy whose listed blocks give all ``rows`` rows PAG's identity image attention."""
    model = copy.deepcopy(model)
    for i in layers:
        original = model.transformer_blocks[i].forward
        model.transformer_blocks[i].forward = lambda *a, original=original, **k: original(*a, rows=BlockRows(((0, rows),)))
    return model


def source_rows(v, src):
    if isinstance(v, tuple):
        return tuple(source_rows(t, src) for t in v)
    return v[src] if torch.is_tensor(v) else v


@pytest.mark.parametrize("name", list(TINY))
def test_slg_and_pag_branches_equal_separate_perturbed_forwards(name):
    model = tiny(name)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    args, kw = inputs(model)
    src = slice(1, 3)
    sub_args, sub_kw = [source_rows(a, src) for a in args], {k: source_rows(v, src) for k, v in kw.items()}
    for layers in [(0,), (1, 2)]:
        branches = (Branch(src, SkipLayers(layers)), Branch(src, IdentityAttention(layers)))
        with torch.no_grad():
            out = model(*args, **kw, branches=branches)
            plain = model(*args, **kw)
            skip_ref = skipped(model, layers)(*sub_args, **sub_kw)
            pag_ref = identity_everywhere(model, layers, 2)(*sub_args, **sub_kw)
            all_in_one = model(*args, **kw, fork=src, branches=branches)
            dg_alone = model(*args, **kw, fork=src)
        assert out.shape[0] == 7 and rel(out[:3], plain) <= SAME
        assert rel(out[3:5], skip_ref) <= SAME and rel(out[5:7], pag_ref) <= SAME, layers
        assert rel(out[3:5], plain[src]) >= EFFECT and rel(out[5:7], plain[src]) >= EFFECT
        assert rel(all_in_one[:5], dg_alone) <= SAME and rel(all_in_one[5:], out[3:]) <= SAME


# ---- one graph --------------------------------------------------------------------------

ROWS = {"plain": {}, "dg_slg_pag": {"fork": slice(2, 3), "branches": (Branch(slice(2, 3), SkipLayers((0,))),
                                                                      Branch(slice(2, 3), IdentityAttention((1,))))}}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("name", list(TINY))
def test_forward_is_one_graph(name, rows):
    """Without and with the DG fork and the SLG / PAG branches (2.1: with condition images and padding)."""
    model = tiny(name, num_layers=2)
    model.ma = mmdit.MASpec(channels=(3, 17), block=1, rho=lambda s: 0.5 * s)
    args, kw = inputs(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args, **kw, **ROWS[rows])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


SMALL_INPUTS = {"qwen-image": dict(B=2, H=4, W=4, L=3, lengths=(3, 2)),
                "qwen-image-2.1": dict(B=2, H=2, W=2, L=5, lengths=(5, 4), images=((2, 2),), slots=(1,))}


@pytest.mark.parametrize("name", list(TINY))
def test_triton_kernels_give_the_torch_path(name, monkeypatch):
    """The fused kernels (interpreted on the CPU) with Qwen's inputs: 2.1's shift-less modulation
    (a stride-0 zero shift), tanh gates, the fork at the first block."""
    model = tiny(name, num_layers=2)
    model.ma = mmdit.MASpec(channels=(3, 17), block=0, rho=0.5, streams=("image", "text"))
    args, kw = inputs(model, **SMALL_INPUTS[name])
    with torch.no_grad():
        want = model(*args, **kw, fork=slice(1, 2))
        monkeypatch.setenv("MMDIT_KERNELS", "triton")
        got = model(*args, **kw, fork=slice(1, 2))
    assert rel(got, want) <= SAME
