"""Flow-matching training: the loss goes down, kernels / checkpointing / compile give the same
step, and a tiny-model folder saves and loads."""
import argparse
import importlib

import pytest
import torch

import mmdit
from mmdit import cli, tiny, train
from mmdit.tiny import recipe, shapes
from mmdit.kernels import dispatch
from mmdit.models.sd3 import SD3Transformer

SMALL = dict(num_layers=1, num_heads=2, head_dim=16, context_dim=32, pooled_dim=32)
SMALL_TEXT = dict(width=32, num_heads=2, mlp_dim=64)


def random_model(seed=0, **overrides):
    """A small TextToImage with torch's default init everywhere (no zero gates, so every
    parameter gets a gradient) and a sin-cos position table."""
    transformer, conditioner = tiny.build_tiny(seed, transformer={**SMALL, **overrides}, text=SMALL_TEXT)
    torch.manual_seed(seed + 1)
    fresh = SD3Transformer(transformer.config)
    fresh.pos_embed.copy_(transformer.pos_embed)
    return recipe.TextToImage(fresh, conditioner)


def fixed_batch(n=2, size=16, seed=0):
    data = shapes.batch(n, seed, size=size)
    g = torch.Generator().manual_seed(seed)
    sigma = train.sample_sigma(n, generator=g, shift=3.0)
    noise = torch.randn(data.images.shape, generator=g)
    return data.images, data.captions, sigma, noise


def step(model, batch, lr=0.1):
    """One SGD step -> (loss, {name: grad}, {name: param after the step})."""
    x0, captions, sigma, noise = batch
    ids = model.conditioner.tokenize(captions)
    model.zero_grad(set_to_none=True)
    loss = model(x0, ids, sigma, noise)
    loss.backward()
    # a parameter that gets no gradient (the last block's unused context ln_q) has None on the
    # torch path and zeros from the Triton backward: count both as zeros
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel_err(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b|, the scale floored at 1e-3 of the largest tensor's
    (some gradients are zero in exact arithmetic, e.g. CLIP's k_proj bias, ~1e-10 in floats)."""
    assert a.keys() == b.keys()
    floor = 1e-3 * max(v.abs().max().item() for v in b.values())
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(floor)).item() for k in a)


def test_sample_sigma():
    g = torch.Generator().manual_seed(0)
    for mode in ("logit_normal", "uniform"):
        s = train.sample_sigma(4000, mode=mode, generator=g)
        assert s.min() > 0 and s.max() < 1
    plain = train.sample_sigma(4000, generator=torch.Generator().manual_seed(1))
    shifted = train.sample_sigma(4000, shift=3.0, generator=torch.Generator().manual_seed(1))
    assert (shifted >= plain).all() and shifted.median() > 0.7  # shift > 1 favours high noise
    with pytest.raises(ValueError, match="sigma mode"):
        train.sample_sigma(2, mode="cosine")


def test_flow_matching_loss_is_the_velocity_error():
    """A model that returns noise - x0 exactly has zero loss; a zero model has |noise - x0|^2."""
    x0 = torch.randn(3, 3, 8, 8)
    noise = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.2, 0.5, 0.9])

    def oracle(x_t, s, context, pooled):
        s = s.view(-1, 1, 1, 1)
        assert torch.allclose(x_t, s * noise + (1 - s) * x0)
        return noise - x0

    assert train.flow_matching_loss(oracle, x0, None, None, sigma=sigma, noise=noise) == 0
    zero = train.flow_matching_loss(lambda x, *a: torch.zeros_like(x), x0, None, None, sigma=sigma, noise=noise)
    assert torch.allclose(zero, (noise - x0).square().mean())


def test_loss_decreases():
    """40 AdamW steps on 32x32 shapes: the loss on a held-out fixed batch drops by > 30%."""
    transformer, conditioner = tiny.build_tiny(0, transformer=dict(SMALL, num_heads=2, head_dim=32, context_dim=32),
                                               text=SMALL_TEXT)
    model = recipe.TextToImage(transformer, conditioner)
    held = fixed_batch(16, size=32, seed=99)

    def held_loss():
        with torch.no_grad():
            x0, captions, sigma, noise = held
            return model(x0, conditioner.tokenize(captions), sigma, noise).item()

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    before = held_loss()
    for i, batch in zip(range(40), shapes.stream(8, seed=1, size=32)):
        sigma = train.sample_sigma(8, generator=g, shift=3.0)
        noise = torch.randn(batch.images.shape, generator=g)
        loss = model(batch.images, conditioner.tokenize(batch.captions), sigma, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


def test_triton_step_equals_torch_step(monkeypatch):
    """One SGD step with MMDIT_KERNELS=triton (the Triton interpreter on CPU) equals the torch
    reference step: loss, every gradient and every updated parameter to 1e-5 of its scale."""
    calls = {"norm_modulate": 0, "gated_residual": 0, "qk_norm_rope": 0}
    # (the package re-exports functions with the modules' names: fetch the modules themselves)
    gr, mod, qk = (importlib.import_module(f"mmdit.kernels.{m}")
                   for m in ("gated_residual", "norm_modulate", "qk_norm_rope"))

    for name, module in (("norm_modulate", mod), ("gated_residual", gr), ("qk_norm_rope", qk)):
        def counted(kernel, _original=module.launch, _name=name):  # every Triton launch of the op
            calls[_name] += 1
            return _original(kernel)

        monkeypatch.setattr(module, "launch", counted)

    batch = fixed_batch(2, size=16)  # 4x4 image tokens + 16 text tokens: quick in the interpreter
    monkeypatch.setenv("MMDIT_KERNELS", "torch")
    ref = step(random_model(), batch)
    assert sum(calls.values()) == 0
    monkeypatch.setenv("MMDIT_KERNELS", "triton")
    assert dispatch.use_triton(torch.zeros(1)), "MMDIT_KERNELS=triton on CPU needs TRITON_INTERPRET=1 (conftest)"
    tri = step(random_model(), batch)
    assert all(calls.values()), f"a Triton launcher was never called: {calls}"
    assert torch.allclose(tri[0], ref[0], rtol=1e-5, atol=0)
    assert max_rel_err(tri[1], ref[1]) < 1e-5
    assert max_rel_err(tri[2], ref[2]) < 1e-5


def test_checkpointing_gives_the_same_gradients():
    batch = fixed_batch(2, size=16)
    model = random_model(num_layers=2)
    plain = step(model, batch, lr=0.0)
    keys = list(model.state_dict())
    recomputed = {"n": 0}
    mlp = model.transformer.joint_blocks[0].x_block.mlp
    handle = mlp.register_forward_hook(lambda *a: recomputed.__setitem__("n", recomputed["n"] + 1))
    train.checkpoint_blocks(model.transformer)
    ckpt = step(model, batch, lr=0.0)
    assert recomputed["n"] == 2  # forward, then again in the backward
    train.checkpoint_blocks(model.transformer, enabled=False)
    recomputed["n"] = 0
    step(model, batch, lr=0.0)
    assert recomputed["n"] == 1
    handle.remove()
    assert list(model.state_dict()) == keys  # wrapping from the outside leaves the keys alone
    assert torch.equal(ckpt[0], plain[0])
    assert max_rel_err(ckpt[1], plain[1]) < 1e-6


def test_checkpointing_flux_blocks():
    model = mmdit.build_transformer("flux.1-dev", num_layers=3, num_heads=2, head_dim=16, axes_dim=(4, 6, 6),
                                    in_channels=16, context_dim=32, pooled_dim=32)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    context, pooled, guidance = torch.randn(2, 5, 32), torch.randn(2, 32), torch.tensor([3.5, 3.5])

    def grads():
        model.zero_grad()
        model(x, sigma, context, pooled, guidance=guidance).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    train.checkpoint_blocks(model)
    assert max_rel_err(grads(), plain) < 1e-6


def compile_matches_eager(device: str, backend: str):
    torch.manual_seed(0)
    model = SD3Transformer(tiny.transformer_config(**SMALL)).to(device)
    x, sigma = torch.randn(2, 3, 16, 16, device=device), torch.tensor([0.3, 0.8], device=device)
    context, pooled = torch.randn(2, 5, 32, device=device), torch.randn(2, 32, device=device)

    def run():
        model.zero_grad()
        v = model(x, sigma, context, pooled)
        v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    v_eager, g_eager = run()
    train.compile_blocks(model, backend=backend, fullgraph=True)
    v_comp, g_comp = run()
    assert (v_comp - v_eager).abs().max() <= 1e-5 * v_eager.abs().max()
    assert max_rel_err(g_comp, g_eager) < 1e-4


def test_compiled_block_matches_eager_on_cpu():
    """Dynamo + AOTAutograd trace each block whole (fullgraph: the kernels are custom ops),
    forward and backward; aot_eager checks the tracing alone, without inductor's codegen."""
    compile_matches_eager("cpu", "aot_eager")


def test_inductor_block_matches_eager_on_cpu():
    """The same through inductor's C++ codegen (a cold compile: ~40 s on 2 cores)."""
    compile_matches_eager("cpu", "inductor")


@pytest.mark.gpu
def test_inductor_block_matches_eager_on_cuda():
    compile_matches_eager("cuda", "inductor")


def test_ema():
    net = torch.nn.Linear(2, 2)
    ema = train.EMA(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # the warm-up decay min(0.5, 2/11) keeps 2/11 of the old value
    assert torch.allclose(ema.shadow["weight"], start + 9 / 11)
    ema.copy_to(net)
    assert torch.allclose(net.weight, start + 9 / 11)


def test_lr_schedule():
    lrs = [recipe.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_wsd_schedule_is_constant_then_a_linear_cool_down():
    lrs = [recipe.lr_at(s, 100, 2.0, 10, schedule="wsd", decay_steps=20) for s in range(100)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lrs[10:80] == [2.0] * 70  # stable: the constant schedule's
    assert lrs[80:] == pytest.approx([2.0 * (100 - s) / 20 for s in range(80, 100)])  # to 0 at step 100
    constant = [recipe.lr_at(s, 80, 2.0, 10, schedule="constant") for s in range(80)]
    assert constant == lrs[:80]  # so a constant run resumed as wsd cools down from its checkpoint


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0.0), (torch.float16, 2e-2)])
def test_tiny_folder_round_trip(tmp_path, dtype, tol):
    transformer, conditioner = tiny.build_tiny(3, transformer=SMALL, text=SMALL_TEXT)
    with torch.no_grad():  # leave the zero init so that the output is not trivially zero
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = mmdit.MASpec(channels=(1, 5), block=0)
    tiny.save_tiny(tmp_path, transformer, conditioner, tiny.ImageSettings(steps=3), ma=spec,
                   meta={"training": {"steps": 1}}, dtype=dtype)
    loaded = tiny.load_tiny(tmp_path)
    t2, c2, settings = loaded
    assert settings.steps == 3 and t2.ma.channels == (1, 5) and t2.ma.block == 0
    assert loaded.meta["training"] == {"steps": 1}
    prompts = ["a red circle on a blue background", ""]
    with torch.no_grad():
        a, b = conditioner.encode(prompts), c2.encode(prompts)
        x = torch.randn(2, 3, 16, 16)
        v1 = transformer(x, torch.tensor([0.5, 0.5]), a["context"], a["pooled"])
        v2 = t2(x, torch.tensor([0.5, 0.5]), b["context"], b["pooled"])
    assert a["context"].shape == (2, tiny.MAX_LENGTH, 32) and a["pooled"].shape == (2, 32)
    assert (v1 - v2).abs().max() <= tol * v1.abs().max()
    images = tiny.generate(loaded, prompts[:1], seed=0, steps=2, cfg=2.0, dg=1.0)  # DG through the stored spec
    assert images.shape == (1, 3, 64, 64) and tiny.to_uint8(images).dtype == torch.uint8


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tiny model"):
        tiny.load_tiny(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a tiny-model config"):
        tiny.load_tiny(tmp_path)


def test_train_entry_point(tmp_path):
    """``mmdit train`` end to end on a 1-layer model: trains, calibrates, saves, loads."""
    assert cli.main(["train", "--steps", "2", "--batch-size", "2", "--layers", "1", "--out", str(tmp_path),
                       "--log-every", "1"]) == 0
    loaded = tiny.load_tiny(tmp_path)
    assert loaded.transformer.config.num_layers == 1 and loaded.meta["training"]["steps"] == 2
    assert loaded.transformer.ma is not None


TRAIN_SMALL = ["--batch-size", "2", "--width", "32", "--heads", "2", "--layers", "2", "--size", "16", "--patch", "4",
               "--threads", "1", "--log-every", "1", "--no-calibrate", "--ema", "0.9"]


def test_train_resume_equals_one_run(tmp_path):
    """3 steps, then 2 more from checkpoint.pt, give the same weights and MA log as 5 in one go;
    the size flags reach the config and the MA CSV has a row per block per logged step."""
    flags = TRAIN_SMALL + ["--schedule", "constant", "--eps", "1e-8", "--betas", "0.9", "0.999", "--ma-every", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["train", "--steps", "5", "--out", str(one)] + flags) == 0
    assert cli.main(["train", "--steps", "3", "--checkpoint-every", "2", "--out", str(two)] + flags) == 0
    assert (two / "checkpoint.pt").is_file() and tiny.load_tiny(two).meta["training"]["steps"] == 3
    assert cli.main(["train", "--steps", "5", "--resume", "--out", str(two)] + flags) == 0
    a, b = tiny.load_tiny(one), tiny.load_tiny(two)
    for k, v in a.transformer.state_dict().items():
        assert torch.equal(v, b.transformer.state_dict()[k]), k
    c = a.transformer.config
    assert (c.hidden_size, c.num_heads, c.num_layers, c.patch_size, c.pos_embed_max_size) == (32, 2, 2, 4, 4)
    assert a.settings.size == 16
    from mmdit.tiny import malog
    rows_one, rows_two = malog.read_log(one / "ma_log.csv"), malog.read_log(two / "ma_log.csv")
    assert [r["step"] for r in rows_one] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [(r["step"], r["ratio"]) for r in rows_two] == [(r["step"], r["ratio"]) for r in rows_one]
    assert all(r["ratio"] >= 1 and r["kurtosis"] > 0 for r in rows_one)


def test_constant_run_cooled_down_on_resume_equals_one_wsd_run(tmp_path):
    """The long run's cool-down: 3 constant steps, resumed as wsd to 5 with 2 decay steps, give
    the weights of one 5-step wsd run."""
    flags = TRAIN_SMALL + ["--warmup", "1", "--ema", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["train", "--steps", "5", "--schedule", "wsd", "--decay-steps", "2", "--out", str(one)] + flags) == 0
    assert cli.main(["train", "--steps", "3", "--schedule", "constant", "--checkpoint-every", "3",
                     "--out", str(two)] + flags) == 0
    assert cli.main(["train", "--steps", "5", "--schedule", "wsd", "--decay-steps", "2", "--resume",
                     "--out", str(two)] + flags) == 0
    a, b = tiny.load_tiny(one).transformer.state_dict(), tiny.load_tiny(two).transformer.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_text_lr_zero_freezes_the_text_encoder(tmp_path):
    """--text-lr 0: the text encoder keeps its initial weights while the transformer trains;
    without the flag the optimizer keeps the two groups of older checkpoints."""
    assert cli.main(["train", "--steps", "2", "--warmup", "0", "--text-lr", "0", "--ema", "0", "--out", str(tmp_path)]
                    + TRAIN_SMALL[:-2]) == 0
    trained = tiny.load_tiny(tmp_path)
    sizes = argparse.Namespace(layers=2, heads=2, width=32, no_qk_norm=False, size=16, patch=4)  # TRAIN_SMALL's
    start_t, start_c = tiny.build_tiny(0, transformer=recipe.model_overrides(sizes))
    for k, v in start_c.text_encoder.state_dict().items():
        assert torch.equal(v.half().float(), trained.conditioner.text_encoder.state_dict()[k]), k
    moved = [k for k, v in start_t.state_dict().items()
             if not torch.equal(v.half().float(), trained.transformer.state_dict()[k])]
    assert len(moved) > 10
    model = recipe.TextToImage(start_t, start_c)
    assert [g["scale"] for g in recipe.param_groups(model, 0.01, None, 1e-3)] == [1.0, 1.0]
    groups = recipe.param_groups(model, 0.01, 1e-4, 1e-3)
    assert [(g["scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.01), (1.0, 0.0), (0.1, 0.01), (0.1, 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_train_flag_errors(tmp_path, capsys):
    assert cli.main(["train", "--steps", "4", "--schedule", "wsd", "--out", str(tmp_path)] + TRAIN_SMALL) == 2
    assert "--schedule wsd needs --steps (4) above --warmup (50)" in capsys.readouterr().err
    assert cli.main(["train", "--steps", "60", "--schedule", "wsd", "--out", str(tmp_path)] + TRAIN_SMALL) == 2
    assert "--schedule wsd needs --decay-steps in 1..10 (--steps 60 minus --warmup 50), got 0" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(tmp_path)] + TRAIN_SMALL) == 2  # no checkpoint yet
    assert cli.main(["train", "--steps", "1", "--out", str(tmp_path)] + TRAIN_SMALL + ["--size", "18"]) == 2
    assert cli.main(["train", "--steps", "1", "--width", "30", "--heads", "4", "--out", str(tmp_path)]) == 2


def test_ma_log_statistics_match_the_probe():
    """malog's ratio is ma.find_massive's statistic (mean |h| over image tokens, top / median),
    and its kurtosis is 3-ish for a random model's Gaussian-like residual stream."""
    from mmdit import ma
    from mmdit.tiny import malog
    model = random_model(0)
    transformer, conditioner = model.transformer, model.conditioner
    probe = malog.probe_batch(n=2, size=16, sigmas=(0.5,))
    rows = malog.block_stats(transformer, conditioner, probe)
    cond = conditioner.encode(probe.captions)
    mag = ma.find_massive(transformer, [(probe.images[0], 0.5, cond["context"], cond["pooled"])], ratio=1.0).magnitude
    for r, m in zip(rows, mag):
        assert r["top_channel"] == int(m.argmax())
        assert r["ratio"] == pytest.approx((m.max() / m.median()).item(), rel=1e-2)
        assert 1.5 < r["kurtosis"] < 10
